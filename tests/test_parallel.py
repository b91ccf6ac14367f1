"""Jobs that run side by side: each job's CPU threads and GPU, a parallel sweep through the joblib
launcher, and the shared caches (data, classifier) built once when several jobs start together."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import pixelcnn.ops.resources as resources
from pixelcnn.data import preprocess
from pixelcnn.ops.datafiles import cache_path, load_idx_dataset
from pixelcnn.ops.resources import cuda_device_args, plan_resources
from fakes import write_dataset
from test_cli import NO_QUALITY, ROOT, TINY, data_args, run, workdir  # noqa: F401 - a fixture


# --- the arithmetic --------------------------------------------------------------------------------
@pytest.mark.parametrize("job_num, concurrent, cpus, gpus, limit, slurm, threads, device", [
    (0, 1, 16, 2, 8, None, None, None),  # a plain run or a serial sweep: torch's defaults
    (3, 1, 16, 2, 8, None, None, None),
    (0, 4, 16, 0, 16, None, 4, None),    # 4 jobs at once share 16 cores
    (5, 4, 16, 2, 16, None, 4, 1),       # job k on GPU k mod G
    (4, 4, 16, 2, 16, None, 4, 0),
    (2, 3, 16, 1, 16, None, 5, 0),       # one GPU: all share it
    (1, 4, 2, 0, 2, None, 1, None),      # more jobs than cores: one thread each, never zero
    (0, 2, 16, 0, 1, None, 1, None),     # OMP_NUM_THREADS=1 (the process's own limit) still holds
    (0, 1, 64, 2, 32, 8, 8, None),       # a SLURM task: its CPUs, and SLURM picks its GPUs
    (0, 1, 64, 0, 4, 8, 4, None),
    (1, 4, 64, 2, 64, 8, 2, 1),          # a parallel sweep inside a SLURM allocation shares the allocation
])
def test_plan_divides_cores_among_jobs_and_puts_job_k_on_gpu_k_mod_g(job_num, concurrent, cpus, gpus, limit,
                                                                      slurm, threads, device):
    plan = plan_resources(job_num, concurrent, cpus, gpus, thread_limit=limit, slurm_cpus=slurm)
    assert (plan.threads, plan.cuda_device) == (threads, device)


def test_a_parallel_job_on_cuda_takes_its_gpu_as_current_and_trainer_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(resources, "concurrent_jobs", lambda: (3, 4))  # job 3 of 4 at once
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this process's threads alone
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    job = resources.claim_job_resources("auto", 1)
    assert job.cuda_device == 1 and chosen == [1] and cuda_device_args(job) == {"devices": [1]}
    assert resources.claim_job_resources("gpu", "auto").cuda_device == 1 and chosen == [1, 1]
    # A CPU job keeps off the GPUs; a multi-device setting (DDP) is the user's and is kept.
    for accelerator, devices in (("cpu", 1), ("auto", 2), ("auto", [0, 1])):
        job = resources.claim_job_resources(accelerator, devices)
        assert job.cuda_device is None and cuda_device_args(job) == {}
    assert chosen == [1, 1]


def test_the_launchers_compose_from_the_plugins_configs():
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        parallel = compose("train", ["hydra/launcher=parallel", "hydra.launcher.n_jobs=4"], return_hydra_config=True)
        slurm = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    assert parallel.hydra.launcher._target_ == resources.JOBLIB_LAUNCHER and parallel.hydra.launcher.n_jobs == 4
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.partition == "gpu"
    assert slurm.hydra.launcher.array_parallelism == 256 and "qos" in slurm.hydra.launcher  # the plugin's other keys


# --- a parallel sweep -------------------------------------------------------------------------------
def test_a_parallel_sweep_runs_its_jobs_with_a_share_of_the_threads(workdir: Path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the sweep's own share, not conftest's one thread per worker
    sweep = workdir / "multirun-parallel"
    result = run("train.py", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *TINY, *NO_QUALITY,
                 *data_args(workdir), "trainer.max_epochs=1", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}",
                 cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    assert len(jobs) == 2 and (sweep / "summary.md").is_file()
    assert [job.name for job in jobs] == ["0_optim.lr=0.001", "1_optim.lr=0.002"]  # the swept key only, in any launcher
    cpus = resources.available_cpus()
    expected = max(1, min(cpus // 2, int(os.environ.get("OMP_NUM_THREADS", cpus))))
    for k, job in enumerate(jobs):  # each job knew it was one of 2 at once, and took its share of the cores
        line = re.search(r"\[pixelcnn.ops.resources\]\[INFO\] - job (\d+): (\d+) CPU threads "
                         r"\(2 jobs at once on (\d+) cores", (job / "train.log").read_text())
        assert line, (job / "train.log").read_text()
        assert (int(line[1]), int(line[2]), int(line[3])) == (k, expected, cpus)


# --- shared caches built once ---------------------------------------------------------------------
def _start_like_a_job(barrier, root: Path, builds: Path, results) -> None:
    """One of several processes that start together on an empty data dir, as parallel jobs do:
    load the data (the cache) and the classifier, counting how often each was really built."""
    import pixelcnn.quality as classifier
    import pixelcnn.data as data
    import pixelcnn.ops.datafiles as datafiles

    def counted(build, name: str, **extra):
        def wrapper(*args, **kwargs):
            with builds.open("a") as log:
                log.write(f"{name}\n")
            time.sleep(0.5)  # a slow build: the other processes arrive while it runs
            return build(*args, **kwargs, **extra)
        return wrapper

    datafiles.locate_dataset = counted(datafiles.locate_dataset, "data")  # runs only when the cache is built
    classifier.fit_and_cache = counted(classifier.fit_and_cache, "classifier", epochs=1)
    barrier.wait()
    datamodule = data.setup_datamodule(root, 16, 4, val_size=20, system_dir=root / "no-system-dataset",
                                       download=False)
    trained = classifier.load_or_train_classifier(datamodule)
    results.put((digest(datamodule.data.values()), digest(trained.state_dict().values())))


def digest(tensors) -> str:
    return hashlib.sha1(b"".join(t.cpu().numpy().tobytes() for t in tensors)).hexdigest()


def test_jobs_starting_together_build_the_data_cache_and_the_classifier_once(tmp_path: Path):
    root, builds, n = tmp_path / "data", tmp_path / "builds.txt", 3
    write_dataset(root, n_train=100, n_test=20)
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as parallel jobs are
    barrier, results = context.Barrier(n), context.Queue()
    processes = [context.Process(target=_start_like_a_job, args=(barrier, root, builds, results)) for _ in range(n)]
    for process in processes:
        process.start()
    outcome = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    # One build of each; the others waited for it and read it: the same data, the very same weights.
    assert sorted(builds.read_text().split()) == ["classifier", "data"]
    assert len(set(outcome)) == 1 and cache_path(root, 16, 4).is_file()
    assert not [p.name for p in root.iterdir() if p.suffix == ".lock"]  # the lock files went with the locks


def test_a_folder_that_cannot_hold_a_lock_still_loads(tmp_path: Path, monkeypatch):
    """A read-only data dir: no lock file can be made there, nor a cache; loading still works."""
    root = tmp_path / "data"
    write_dataset(root, n_train=100, n_test=20)
    from filelock import FileLock

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", self.lock_file)

    monkeypatch.setattr(FileLock, "acquire", refuse)
    data = load_idx_dataset(root, root / "no-system-dataset", False, 16, 4, preprocess)
    assert data["train_images"].shape == (100, 1, 16, 16)


def test_a_failed_first_build_leaves_no_empty_data_folder(tmp_path: Path):
    from pixelcnn.ops.datafiles import DatasetNotFoundError

    root = tmp_path / "typo" / "data"
    with pytest.raises(DatasetNotFoundError):
        load_idx_dataset(root, tmp_path / "no-system-dataset", False, 16, 4, preprocess)
    assert not (tmp_path / "typo").exists()
