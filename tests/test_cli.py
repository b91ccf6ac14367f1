"""The commands users type: config composition, train.py end to end (incl. resume and a sweep),
sample.py on the resulting checkpoint, and one clear error line for every bad input."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from commands import run, run_here
from fakes import write_dataset
from test_layout import ENTRY_POINTS
from pixelcnn.ops.callbacks import SampleGridCallback
from pixelcnn.ops.checkpoints import load_module, resolve_checkpoint
from pixelcnn.commands.cli import check_command_line
from pixelcnn.ops.rules import as_override, validate
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.sweep import collect_runs, summary_table
from pixelcnn.ops.resources import SpeedChoices, resolve_speed
from pixelcnn.training import build_callbacks, build_datamodule, build_module

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.filters=8", "model.residual_blocks=1", "data.batch_size=16", "data.eval_batch_size=20",
    "data.val_size=20", "data.download=false", "trainer.limit_train_batches=3", "trainer.max_epochs=2",
    "sample.every_n_epochs=1", "sample.n=4", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]
NO_QUALITY = ["quality_n=0"]  # the end-of-run sample-quality check is covered once, by `trained_run`


def compose_train(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A launch dir with tiny IDX files in its data/ and no fallback to the system dataset."""
    path = tmp_path_factory.mktemp("work")
    write_dataset(path / "data", n_train=100, n_test=20)
    return path


def data_args(workdir: Path) -> list[str]:
    return [f"data.root={workdir / 'data'}", f"data.system_dir={workdir / 'no-system-dataset'}"]


@pytest.fixture(scope="module")
def trained_run(workdir: Path) -> Path:
    run_dir = workdir / "outputs" / "run"
    # fp32: the test below re-scores the test split in fp32 (on a CPU with native bf16, auto trains and tests in bf16).
    result = run("train.py", *TINY, *data_args(workdir), "quality_n=30", "trainer.precision=32-true",
                 f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def fashion_mnist():
    """The default data module, read (what `build_module` takes the data's classes and source from)."""
    datamodule = build_datamodule(compose_train(*TINY))
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


# --- configuration --------------------------------------------------------------------------------
def test_defaults_are_the_seed_model():
    cfg = compose_train()
    assert (cfg.optim.lr, cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.levels) == (1e-4, 150, 128, 4)
    module = instantiate(cfg.model)
    assert sum(p.numel() for p in module.parameters()) == 307_460


def test_overrides_reach_the_objects():
    cfg = compose_train("model.filters=32", "model.residual_blocks=3", "data.levels=8", "optim.lr=5e-4",
                        "sample.temperature=0.7", "seed=3", "model=pixelcnn")
    module = instantiate(cfg.model, optim=cfg.optim)
    assert len(module.net.blocks) == 3 and module.net.to_logits.out_channels == 8 and module.optim["lr"] == 5e-4
    gated = instantiate(compose_train("model=gated", "model.layers=2", "model.channels=8").model)
    assert gated.hparams.arch == "gated" and len(gated.net.gated_layers) == 2
    quick = compose_train("experiment=quick")
    assert (quick.model.filters, quick.model.residual_blocks, quick.optim.lr) == (32, 2, 1e-3)
    quick_gated = compose_train("experiment=quick_gated").model
    assert quick_gated.num_classes == "auto"  # the data's class count, once it is read (training.resolve_num_classes)
    quick_gated = instantiate(quick_gated, num_classes=10)
    assert quick_gated.hparams.arch == "gated" and quick_gated.conditional and len(quick_gated.net.gated_layers) == 4


def test_speed_auto_picks_per_device(monkeypatch):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # a CPU without native bf16 (faked)
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    on_cpu = resolve_speed(compose_train("trainer.accelerator=cpu"))
    assert on_cpu == SpeedChoices(cuda=False, compile=False, precision="32-true", channels_last=False)
    forced = resolve_speed(compose_train("trainer.accelerator=cpu", "speed.compile=true", "trainer.precision=bf16-mixed"))
    assert forced.compile and forced.precision == "bf16-mixed" and not forced.channels_last


def test_callbacks_follow_the_config(tmp_path: Path):
    speed = resolve_speed(compose_train("trainer.accelerator=cpu"))
    kinds = {type(c).__name__: c for c in build_callbacks(compose_train("early_stopping_patience=3"), tmp_path, speed)}
    assert kinds["EarlyStopping"].patience == 3 and kinds["EarlyStopping"].monitor == "val/bpd"
    assert kinds["RunDirCheckpoint"].monitor == "val/bpd" and kinds["SampleGridCallback"].every_n_epochs == 5
    assert "EarlyStopping" not in {type(c).__name__ for c in build_callbacks(compose_train(), tmp_path, speed)}


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="model.typo"):
        compose_train("model.typo=3")


# --- train.py end to end -----------------------------------------------------------------------------
def test_train_writes_checkpoints_logs_and_metrics(trained_run: Path):
    checkpoints = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0 < metrics["test_bpd"] < 3 and 0 < metrics["val_bpd"] < 3 and metrics["epochs"] == 2
    assert metrics["frechet_distance"] > 0 and metrics["quality_n"] == 20  # capped at the 20 test images
    # The test split is scored with the best checkpoint's weights.
    best = load_module(metrics["best_checkpoint"])
    test_images = torch.load(trained_run.parent.parent / "data" / "fashion_mnist_16px_4lv.pt")["test_images"]
    with torch.no_grad():
        assert metrics["test_bpd"] == pytest.approx(best.mean_bits_per_dim(test_images, None).item(), rel=1e-5)
    events = EventAccumulator(str(trained_run / "tb")).Reload()
    assert any(tag.startswith("samples/") for tag in events.Tags()["images"])
    assert {"train/bpd_epoch", "val/bpd", "test/bpd"} <= set(events.Tags()["scalars"])


def test_lightning_training_knobs_from_the_command_line(workdir: Path):
    """trainer.gradient_clip_val / gradient_clip_algorithm / accumulate_grad_batches and a scheduler
    reach Lightning from the command line, and the lr goes to TensorBoard."""
    run_dir = workdir / "outputs" / "knobs"
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(workdir),
                 "trainer.gradient_clip_val=1.0", "trainer.gradient_clip_algorithm=value",
                 "trainer.accumulate_grad_batches=2", "optim/scheduler=cosine", "optim.scheduler.warmup_steps=1",
                 f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4  # 2 epochs x ceil(3 batches / 2 accumulated) optimizer steps
    assert last["lr_schedulers"][0]["last_epoch"] == 4  # stepped once per optimizer step
    assert last["hyper_parameters"]["optim"]["scheduler"] == {"name": "cosine", "warmup_steps": 1, "final_lr_ratio": 0.01}
    assert "train/lr" in EventAccumulator(str(run_dir / "tb")).Reload().Tags()["scalars"]
    # Resuming restores the schedule's position and keeps stepping it.
    result = run("train.py", f"ckpt_path={run_dir}", "trainer.max_epochs=3", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6 and last["lr_schedulers"][0]["last_epoch"] == 6


def test_resume_continues_the_same_run(workdir: Path, trained_run: Path):
    last = trained_run / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=False)
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(workdir), f"ckpt_path={last}", "trainer.max_epochs=3",
                 cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    after = torch.load(last, map_location="cpu", weights_only=False)  # same run dir, updated in place
    assert (before["epoch"], after["epoch"]) == (1, 2)
    assert after["global_step"] == before["global_step"] + 3  # one more epoch of 3 optimizer steps
    assert after["optimizer_states"][0]["state"][0]["step"] > before["optimizer_states"][0]["state"][0]["step"]
    assert json.loads((trained_run / "metrics.json").read_text())["epochs"] == 3


def test_resume_from_the_run_dir_alone_reapplies_its_overrides(workdir: Path, trained_run: Path):
    """`train.py ckpt_path=<run dir>` continues from last.ckpt with the run's own overrides
    (TINY, data paths, ...) and leaves the run's .hydra record as it was."""
    record = (trained_run / ".hydra" / "config.yaml").read_text()
    epochs = json.loads((trained_run / "metrics.json").read_text())["epochs"]
    result = run("train.py", f"ckpt_path={trained_run}", f"trainer.max_epochs={epochs + 1}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "re-applying the run's overrides" in result.stdout and "model.filters=8" in result.stdout
    assert json.loads((trained_run / "metrics.json").read_text())["epochs"] == epochs + 1
    assert (trained_run / ".hydra" / "config.yaml").read_text() == record
    assert list((trained_run / ".hydra").glob("resume-*/config.yaml"))


@pytest.mark.parametrize("override, saved", [
    ("model.filters=16", "model.filters=8"),
    ("model=gated", "model.arch='pixelcnn'"),  # another group: the run's choice is not forced on top of it
    ("data.levels=8", "data.levels=4"),  # the model's levels follow data.levels: named as the user sets it
])
def test_resume_with_another_model_fails_cleanly(workdir: Path, trained_run: Path, override: str, saved: str):
    records = sorted((trained_run / ".hydra").iterdir())
    result = run_here("train.py", f"ckpt_path={trained_run}", override, cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ckpt_path=") and saved in line
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert sorted((trained_run / ".hydra").iterdir()) == records  # a refused resume leaves no record


def test_a_resume_uses_a_new_lr_and_keeps_it(workdir: Path, trained_run: Path, tmp_path: Path):
    """The optim group may change on resume: the new lr is the one the optimizer steps with (it is
    in the optimizer state saved after the resume), it is printed, and the next plain resume keeps it."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    epochs = json.loads((copy / "metrics.json").read_text())["epochs"]
    result = run("train.py", f"ckpt_path={copy}", "optim.lr=0.003", f"trainer.max_epochs={epochs + 1}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "now used: optim.lr=0.003 (was 0.0001)" in result.stdout
    last = torch.load(copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == epochs and last["hyper_parameters"]["optim"]["lr"] == 0.003
    assert [group["lr"] for group in last["optimizer_states"][0]["param_groups"]] == [0.003]
    result = run("train.py", f"ckpt_path={copy}", cwd=workdir)  # its newest record: lr 0.003, max_epochs + 1
    assert result.returncode == 0 and "has already finished" in result.stdout, result.stderr[-3000:]
    assert "optim.lr=0.003" in result.stdout


def test_init_from_starts_a_new_run_from_the_weights(workdir: Path, trained_run: Path, tmp_path: Path):
    speed = SpeedChoices(cuda=False, compile=False, precision="32-true", channels_last=False)
    saved = torch.load(resolve_checkpoint(trained_run), map_location="cpu", weights_only=True)["state_dict"]
    module = build_module(compose_train(*TINY, f"init_from={trained_run}"), speed, fashion_mnist())
    assert saved.keys() == module.state_dict().keys()
    assert all(torch.equal(tensor, module.state_dict()[name]) for name, tensor in saved.items())
    with pytest.raises(UserError, match=r"^init_from=.* model.filters=8, this config has 16"):
        build_module(compose_train(*TINY, "model.filters=16", f"init_from={trained_run}"), speed, fashion_mnist())
    with pytest.raises(UserError, match="not both"):
        validate(compose_train(f"init_from={trained_run}", f"ckpt_path={trained_run}"), "train")
    tuned = tmp_path / "tuned"
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(workdir), f"init_from={trained_run}", "trainer.max_epochs=1",
                 "optim.lr=0.002", f"hydra.run.dir={tuned}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[pixelcnn] init_from: the weights of" in result.stdout
    last = torch.load(tuned / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # A new run: its own first epoch of 3 steps, with an optimizer that starts at step 0 (trained_run's is past 6).
    assert last["global_step"] == 3 and last["optimizer_states"][0]["state"][0]["step"] == 3
    assert last["hyper_parameters"]["optim"]["lr"] == 0.002


def test_a_run_dir_with_spaces_and_accents_pastes_as_printed(workdir: Path, trained_run: Path, tmp_path: Path):
    """train.py prints its next commands with the run dir quoted for the shell and for Hydra's
    grammar (which cannot read non-ASCII letters unquoted); pasted as printed, they work. An
    unquoted one is one line saying how to quote it."""
    copy = tmp_path / "my runs" / "épreuve 1"
    shutil.copytree(trained_run, copy)
    epochs = json.loads((copy / "metrics.json").read_text())["epochs"]
    [resume] = shlex.split(as_override("ckpt_path", copy))  # what the shell hands over, quotes for Hydra kept
    result = run("train.py", resume, f"trainer.max_epochs={epochs + 1}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    [printed] = [line for line in result.stdout.splitlines() if line.startswith("[pixelcnn] samples: ")]
    sample_command = shlex.split(printed.split("samples: ", 1)[1].split(";")[0])
    assert sample_command[:2] == ["python", "sample.py"]
    result = run_here("sample.py", *sample_command[2:], "n=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((copy / "samples").glob("*.png"))
    result = run_here("sample.py", f"ckpt={copy}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: Hydra cannot read") and as_override("ckpt", copy) in line


def test_a_failed_resume_never_deletes_the_folder(tmp_path: Path):
    folder = tmp_path / "my_runs"
    (folder / "keep").mkdir(parents=True)
    (folder / "keep" / "notes.txt").write_text("precious")
    result = run_here("train.py", f"ckpt_path={folder}", cwd=tmp_path)
    assert result.returncode == 2 and "folder without checkpoints" in result.stderr
    assert (folder / "keep" / "notes.txt").read_text() == "precious"


def test_run_dir_checkpoint_choice(tmp_path: Path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("best-epoch1000-val_bpd0.6000.ckpt", "best-epoch002-val_bpd0.5000.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"")
    assert resolve_checkpoint(tmp_path).name == "best-epoch002-val_bpd0.5000.ckpt"  # lowest val, not last name
    assert resolve_checkpoint(tmp_path, prefer="last").name == "last.ckpt"
    # The latest by saved step, whatever type a file gives it (a foreign file's "global_step" is any value).
    torch.save({"global_step": "many"}, folder / "last.ckpt")
    torch.save({"global_step": 3}, folder / "step.ckpt")
    assert resolve_checkpoint(tmp_path, prefer="last").name == "step.ckpt"


@pytest.mark.parametrize("every, max_epochs, due_epochs", [(5, 12, [5, 10, 12]), (5, -1, [5, 10]), (0, 12, [])])
def test_sample_grid_schedule(every: int, max_epochs: int, due_epochs: list[int]):
    grids = SampleGridCallback(every, n=64, temperature=1.0, seed=0, method="fast")
    assert [e for e in range(1, 13) if grids.due(e, max_epochs, stopping=False)] == due_epochs
    assert grids.due(7, max_epochs, stopping=True) == (every > 0)  # early stopping: a last grid


def test_sample_py_writes_png_and_levels(workdir: Path, trained_run: Path):
    out = workdir / "samples"
    result = run_here("sample.py", f"ckpt={trained_run}", "n=6", "temperature=[0.5,1.0]", f"out={out}", "scale=4",
                      cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    [png], [npy] = list(out.glob("*.png")), list(out.glob("*.npy"))
    assert str(png) in result.stdout and str(npy) in result.stdout
    levels = np.load(npy)
    assert levels.shape == (2, 6, 16, 16) and levels.min() >= 0 and levels.max() <= 3
    width, height = Image.open(png).size
    # Two grids of 6 images (16px x scale 4, 2px padding) side by side with an 8px gap.
    assert (width, height) == (2 * (6 * (16 * 4 + 2) + 2) + 8, 16 * 4 + 2 * 2)
    assert not np.array_equal(levels[0], levels[1])  # each temperature drew its own images


def test_sweep_summary_rows_come_from_each_job(tmp_path: Path):
    for job, metrics in enumerate([{"val_bpd": 0.7, "test_bpd": 0.71}, {"val_bpd": 0.5, "test_bpd": 0.52}, None]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={job}\n- seed=1\n")
        (tmp_path / str(job) / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {job}\n")
        if metrics:  # job 2 died before writing metrics
            (tmp_path / str(job) / "metrics.json").write_text(json.dumps({**metrics, "epochs": 3, "parameters": 10}))
    lines = summary_table(collect_runs(tmp_path)).splitlines()
    assert lines[:3] == ["3 jobs: 2 ok, 1 failed.", "Best: job 1 (optim.lr=1), best val 0.5000 bits/dim.",
                         "Overrides of every job: seed=1"]
    assert lines[-3:] == ["| 1 | 1 | optim.lr=1 | 0.5000 | 0.5200 | 3 | 10 | ok |",  # ranked by val bits/dim
                          "| 2 | 0 | optim.lr=0 | 0.7000 | 0.7100 | 3 | 10 | ok |",
                          "| - | 2 | optim.lr=2 | - | - |  |  | failed: no metrics.json: the job was killed or is still running |"]


def test_multirun_writes_one_dir_per_job_and_a_summary(workdir: Path):
    sweep = workdir / "multirun"
    # Job dirs are named by the sorted overrides, cut at 120 characters: TINY's data.* keys would push optim.lr out.
    names = "hydra.job.config.override_dirname.exclude_keys=[ckpt_path,init_from,data.root,data.system_dir,data.batch_size]"
    result = run("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), "trainer.max_epochs=1", "optim.lr=1e-3,2e-3",
                 f"hydra.sweep.dir={sweep}", names, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").is_file()]
    assert len(jobs) == 2 and all("optim.lr=" in p.name for p in jobs)
    summary = (sweep / "summary.md").read_text()
    assert "optim.lr=0.001" in summary and "optim.lr=0.002" in summary and summary.count("| ok |") == 2


# --- bad input: one line, exit != 0, nothing half-written --------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("model.residual_blocks=-1", "model.residual_blocks"),  # config.validate
    ("model.residul_blocks=5", "model.residul_blocks"),  # Hydra: not a key
    # resolve_speed, after the data is loaded
    ("trainer.accelerator=gpu" if not torch.cuda.is_available() else "trainer.accelerator=tpu", "trainer.accelerator"),
])
def test_bad_train_input_fails_cleanly(workdir: Path, override: str, key: str):
    run_dir = workdir / "outputs" / f"bad-{key}"
    result = run_here("train.py", *TINY, *NO_QUALITY, *data_args(workdir), override, f"hydra.run.dir={run_dir}",
                      cwd=workdir)
    assert result.returncode != 0
    assert key in result.stderr.splitlines()[0] or key in result.stderr.splitlines()[1]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides, message", [
    (["experiment=quick", "model=gated", "data.val_size=20"], "model.filters is not an option of model.arch=gated"),
    (["model.arch=transformer", "data.val_size=20"], "model.arch='transformer' is unknown"),
    (["data.val_size=100"], "data.val_size=100 is invalid: the training file has 100 images"),
])
def test_options_that_do_not_fit_fail_cleanly(workdir: Path, overrides: list[str], message: str):
    run_dir = workdir / "outputs" / "bad-arch"
    result = run_here("train.py", *overrides, *NO_QUALITY, *data_args(workdir), f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 2 and not run_dir.exists()
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: " + message)


@pytest.mark.parametrize("override, key", [
    ("model.filters=0", "model.filters"),
    ("data.levels=1", "data.levels"),
    ("sample.temperature=0", "sample.temperature"),
    ("sample.temperature=[1.0,2.0]", "sample.temperature"),  # the grid takes one temperature
    ("model.input_kernel=1", "model.input_kernel"),  # a type-A 1x1 conv would see nothing
    ("model.levels=8", "model.levels"),  # must follow data.levels
    ("data.hflip=maybe", "data.hflip"),
    ("speed.compile=maybe", "speed.compile"),
    ("trainer.precision=63", "trainer.precision"),
    ("trainer.precision=32.0", "trainer.precision"),  # 32.0 == 32, but Lightning's Trainer fails on it
    ("data.channels=3.0", "data.channels"),  # a count is an integer, whatever == says
    ("trainer.max_epochs=-1.0", "trainer.max_epochs"),
    ("trainer.devices=-1.0", "trainer.devices"),
    ("trainer.max_time=abc", "trainer.max_time"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=[0,0]", "trainer.devices"),
    ("trainer.devices=gpu", "trainer.devices"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.strategy=fsdp", "trainer.strategy"),
    ("model=gated model.dilations=[0]", "model.dilations"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("trainer.gradient_clip_algorithm=max", "trainer.gradient_clip_algorithm"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("+trainer.overfit_batches=-1", "trainer.overfit_batches"),
    ("+trainer.val_check_interval=1.5", "trainer.val_check_interval"),
    ("+trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("+trainer.fast_dev_run=-1", "trainer.fast_dev_run"),
    ("model=gated model.dropout=false", "model.dropout"),  # a boolean is no number, though False == 0
    ("optim.weight_decay=true", "optim.weight_decay"),
    ("trainer.max_epochs=true", "trainer.max_epochs"),
    ("early_stopping_patience=true", "early_stopping_patience"),
    ("quality_n=false", "quality_n"),
    ("optim/scheduler=cosine optim.scheduler.warmup_steps=-1", "optim.scheduler.warmup_steps"),
    ("optim/scheduler=cosine optim.scheduler.final_lr_ratio=2", "optim.scheduler.final_lr_ratio"),
    ("optim/scheduler=plateau optim.scheduler.factor=1", "optim.scheduler.factor"),
    ("optim/scheduler=cosine trainer.max_epochs=-1", "optim/scheduler"),  # no run length to decay over
    ("optim/scheduler=plateau trainer.limit_val_batches=0", "optim/scheduler"),  # nothing to step on
])
def test_bad_values_are_named_by_validate(override: str, key: str):
    """The same UserError path as above (exit 2, one line), checked in-process for each rule."""
    with pytest.raises(UserError, match=rf"^{key}="):
        validate(compose_train(*override.split()), "train")


@pytest.mark.parametrize("script, config, arg, addable", [
    ("train.py", "train", "+data.foo=1", True),  # the data module would fail on it as an unforeseen TypeError
    ("train.py", "train", "+sample.foo=1", True),
    ("train.py", "train", "+optim.betas=[0.9,0.99]", True),  # read by nothing: silently ignored before
    ("train.py", "train", "+optim.scheduler.foo=1", True),
    ("train.py", "train", "+speed.foo=1", True),
    ("train.py", "train", "+foo=1", True),
    ("bench.py", "bench", "+bench.foo=1", True),
    ("sample.py", "sample", "+foo=1", False),
    ("evaluate.py", "evaluate", "+quality.n=5", False),
])
def test_a_key_added_where_nothing_reads_it_is_refused(capsys, script: str, config: str, arg: str, addable: bool):
    """Hydra adds any key with +key=value; one that no code reads is a typo gone silent: one line, exit 2.
    Keys of trainer and model stay addable (Lightning's Trainer and the network check them, below)."""
    conf = ROOT / "conf" / ("entry" if config in ("sample", "evaluate") else "")
    with pytest.raises(SystemExit) as exit_:
        check_command_line([script, arg], conf, config)
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    key = arg[1:].partition("=")[0]
    assert line.startswith(f"error: {key} is not an option: +{key} adds a key that nothing reads")
    assert ("only keys of trainer and model can be added" if addable else "no key can be added here") in line
    assert line.endswith(f"python {script} --cfg job lists the keys")
    check_command_line([script, "+hydra.job.env_set.X=1", "++seed=3", *(["+trainer.max_time=null", "+model.foo=1",
                                                             "+experiment=quick"] if addable else [])], conf, config)


@pytest.mark.parametrize("script, flags, expected", [
    ("train.py", ["-m", "--cfg", "job"], "error: Only one of --run, --multirun, --cfg, --info and --shell_completion"),
    ("train.py", ["-m", "seed=0,1", "--info"], "error: Only one of --run, --multirun, --cfg, --info"),
    ("sample.py", ["--resolve"], "error: The --resolve flag can only be used in conjunction with --cfg or --help"),
    ("evaluate.py", ["--config-dir", "nowhere", "--cfg", "job"], "error: Additional config directory '"),
    ("bench.py", ["--cfg", "job", "--package", "nope"], "package 'nope' not found in config"),  # Hydra's own line
    # Hydra unpickles the file (code could run), then failed: this project writes no config.pickle.
    *((f"{name}.py", ["--experimental-rerun", "config.pickle"], "error: --experimental-rerun is not taken here: it "
                                                               "would unpickle a file") for name in ENTRY_POINTS),
])
def test_hydra_flags_that_do_not_go_together_are_one_line_and_exit_2(tmp_path: Path, script, flags, expected):
    """Hydra's checks of its own flags were unforeseen errors (exit 1, a traceback file); `--help` stays exit 0."""
    result = run_here(script, *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(expected) and "unforeseen" not in line
    assert not list(tmp_path.iterdir())  # nothing written: no run dir, no outputs/
    assert run_here(script, "--help", cwd=tmp_path).returncode == 0


def test_the_hydra_config_prints_resolved(tmp_path: Path):
    """`--cfg hydra --resolve` (Hydra's own flags) was an unforeseen error: the run dir named a key of the job's
    config, which `--cfg hydra` leaves out."""
    result = run_here("train.py", "--cfg", "hydra", "--resolve", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["hydra"]["run"]["dir"].startswith("outputs/")


@pytest.mark.parametrize("args", [["logger=null"], ["-m", "logger=csv,null"], ["hparams_search=null"]])
def test_a_group_set_to_null_names_the_options_and_how_to_leave_it_out(capsys, args: list[str]):
    """Hydra takes no `group=null` on the command line (an unforeseen ValueError, exit 1): one line, exit 2."""
    group = args[-1].partition("=")[0]
    with pytest.raises(SystemExit) as exit_:
        check_command_line(["train.py", *args], ROOT / "conf", "train")
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {group}=null is not an option: choose one of ")
    assert line.endswith(f"or leave the group out with '~{group}'")
    assert "csv, mlflow, tensorboard" in line if group == "logger" else "optuna" in line


def test_a_key_forced_with_plus_plus_is_refused_unless_the_config_has_it(capsys):
    """`++key=value` adds the key, or overrides it where the config has it: only the addition of a key nothing
    reads is refused (it was silently ignored), judged on the config the rest of the command line composes."""
    for argv, config, key in ((["train.py", "++optim.lrr=1"], "train", "optim.lrr"),
                              (["train.py", "-m", "seed=0,1", "++foo.bar=1"], "train", "foo.bar"),  # a sweep
                              (["sample.py", "++tempratur=0.5"], "sample", "tempratur")):
        conf = ROOT / "conf" / ("entry" if config == "sample" else "")
        with pytest.raises(SystemExit) as exit_:
            check_command_line(argv, conf, config)
        assert exit_.value.code == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {key} is not an option: ++{key} adds a key that nothing reads")
    check_command_line(["train.py", "-m", "seed=0,1", "++optim.lr=1e-3", "model=gated", "++model.dropout=0.1"],
                       ROOT / "conf", "train")
    check_command_line(["train.py", "-m", "hparams_search=optuna", "model.dropout=interval(0.0,0.5)", "++optim.lr=1e-3"],
                       ROOT / "conf", "train")  # a search interval: not a value Hydra composes with
    # A sweep of a group's options: plateau's jobs have the key, cosine's do not (each job has keys of its own).
    check_command_line(["train.py", "-m", "optim/scheduler=cosine,plateau", "++optim.scheduler.factor=0.5"],
                       ROOT / "conf", "train")
    check_command_line(["sample.py", "++ckpt=x"], ROOT / "conf" / "entry", "sample")  # ckpt: ??? in the config
    with pytest.raises(SystemExit):  # the config does not compose: the reason is named, not the ++ key
        check_command_line(["train.py", "++foo=1", "model=nonexistent"], ROOT / "conf", "train")
    assert "model=nonexistent is not an option" in capsys.readouterr().err


def test_an_added_trainer_key_must_be_a_lightning_trainer_argument():
    with pytest.raises(UserError, match=r"^trainer.max_epoch is not an argument of Lightning's Trainer: did you mean "
                                        r"trainer.max_epochs"):
        validate(compose_train("+trainer.max_epoch=3"), "train")
    validate(compose_train("+trainer.overfit_batches=2"), "train")  # a Lightning knob is welcome


@pytest.mark.parametrize("arg, where", [
    ("+trainer.logger=false", "'~logger'"), ("+trainer.default_root_dir=elsewhere", "hydra.run.dir"),
    ("+trainer.callbacks=[]", "checkpoint_every_n_steps"), ("+trainer.plugins=[]", "its own writer"),
    ("+trainer.enable_checkpointing=false", "always checkpoints"),
    ("+trainer.barebones=true", "need Lightning's full loop"),  # was refused as logger=[<object at 0x...>]
    ("+trainer.use_distributed_sampler=false", "shards the data across DDP ranks"),  # was ignored
])
def test_a_trainer_argument_the_run_sets_itself_is_refused_not_replaced(workdir: Path, arg: str, where: str):
    """Lightning's Trainer takes these, but the run passes its own (its loggers, run dir, callbacks, checkpoint
    writer): an added value would be replaced without a word (or refused by Lightning as if the devices did not fit).
    One line naming where it is set, exit 2, before anything is written; in a sweep's pre-check too."""
    with pytest.raises(UserError, match=rf"^trainer.{arg[9:].partition('=')[0]} is not a setting here: .*{where}"):
        validate(compose_train(arg), "train")
    result = run_here("train.py", arg, f"hydra.run.dir={workdir / 'set_by_run'}", cwd=workdir)
    assert result.returncode == 2 and not (workdir / "set_by_run").exists(), result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert "do not fit this machine" not in result.stderr and where in result.stderr


def test_a_group_added_that_the_config_has_already_says_to_drop_the_plus(workdir: Path):
    result = run_here("train.py", "+experiment=quick", f"hydra.run.dir={workdir / 'added'}", cwd=workdir)
    assert result.returncode == 2 and not (workdir / "added").exists()
    assert result.stderr.strip() == ("error: experiment is chosen by the config already: pass experiment=quick "
                                     "(without +) to change it")


def test_the_network_object_is_not_a_setting():
    """`net` is ImageModel's argument for the built network: as a config key it is refused like any unknown option."""
    with pytest.raises(UserError, match=r"^model.net is not an option of model.arch=pixelcnn"):
        validate(compose_train("+model.net=5"), "train")


def test_missing_dataset_names_all_three_sources(workdir: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_here("train.py", *TINY, *NO_QUALITY, f"data.root={tmp_path / 'empty'}",
                      f"data.system_dir={tmp_path / 'none'}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2 and not run_dir.exists() and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: Fashion-MNIST not found")
    assert str(tmp_path / "empty") in message and str(tmp_path / "none") in message and "download" in message


@pytest.mark.parametrize("make_ckpt, message", [
    (lambda d: d / "missing.ckpt", "does not exist"),
    (lambda d: "", "is empty"),
    (lambda d: (d / "notes.ckpt").write_text("not a checkpoint") and d / "notes.ckpt", "not a readable"),
    (lambda d: torch.save({"state_dict": {}}, d / "other.ckpt") or d / "other.ckpt", "not a checkpoint of this"),
])
def test_bad_checkpoint_fails_cleanly(tmp_path: Path, make_ckpt, message):
    result = run_here("sample.py", f"ckpt={make_ckpt(tmp_path)}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ckpt") and message in line
    assert not (tmp_path / "out").exists()


def test_bench_py_table_and_json_for_a_conditional_model(workdir: Path, tmp_path: Path):
    out = tmp_path / "results" / "bench.json"
    (tmp_path / "notes.txt").write_text("a user's file")  # launched from a folder with files, like `make bench`
    result = run("bench.py", *data_args(workdir), "data.download=false", "data.val_size=20", "data.batch_size=16",
                 "model.filters=8", "model.residual_blocks=1", "model.num_classes=10", "bench.repeats=1",
                 "bench.warmup_batches=1", "bench.train_batches=2", "bench.sample_sizes=[3]", "bench.epoch=estimate",
                 "trainer.max_epochs=-1", f"bench.out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    assert measured["train"]["img_per_s"] > 0 and measured["config"]["model"]["num_classes"] == 10
    assert set(measured["sampling"]) == {"3"} and measured["sampling"]["3"]["naive_s"] > 0
    assert "| train img/s (Lightning loop, median) |" in result.stdout and "| sample 3: naive / fast |" in result.stdout
    assert measured["train"]["plain_fp32_img_per_s"] > 0 and "| train img/s, plain PyTorch fp32 loop" in result.stdout
    assert "| ratio: Lightning loop (" in result.stdout and "| ratio: fast / naive sampling, n=3 |" in result.stdout
    # trainer.max_epochs=-1: no run length to estimate (it was a negative number of minutes)
    assert measured["train"]["est_run_min"] is None
    assert "| full run at max_epochs (min) | no epoch limit |" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results"]  # no log file, no run dir


@pytest.mark.parametrize("system, maxrss", [("Linux", 3 * 2**20), ("Darwin", 3 * 2**30)])
def test_bench_peak_memory_reads_ru_maxrss_in_the_platform_unit(monkeypatch, system: str, maxrss: int):
    """getrusage's ru_maxrss is KiB on Linux and bytes on macOS: 3 GiB of peak memory is 3072 MiB on both."""
    import resource
    from types import SimpleNamespace

    from pixelcnn.commands import bench

    monkeypatch.setattr(bench.platform, "system", lambda: system)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=maxrss))
    assert bench.peak_memory_mb(torch.device("cpu")) == 3072


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_bench_py_replaces_no_file(tmp_path: Path, existing: str):
    """An earlier result (or a folder) at bench.out is refused in one line before any measuring, left as it was."""
    out = tmp_path / "bench.json"
    out.write_text("earlier") if existing == "file" else out.mkdir()
    result = run_here("bench.py", f"bench.out={out}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (f"error: bench.out={out} exists: pass a new file name "
                                                                "(a benchmark replaces no file)")
    assert (out.read_text() == "earlier") if existing == "file" else list(out.iterdir()) == []


def test_bench_py_refuses_a_warmup_as_long_as_the_epoch(workdir: Path, tmp_path: Path):
    # 80 training images: 5 batches
    result = run_here("bench.py", *data_args(workdir), "data.download=false", "data.val_size=20", "data.batch_size=16",
                      "bench.warmup_batches=5", f"bench.out={tmp_path / 'bench.json'}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == ("error: bench.warmup_batches=5 leaves none of an "
                                                                "epoch's 5 batches to time: lower it")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    ([], "error: ckpt is required"),
    (["ckpt={run}", "out={file}"], "is a file; pass a folder"),
    (["ckpt={run}", "out={file}/inside"], "is a file; pass a folder"),
    (["ckpt={run}", "scale=0"], "scale=0 is invalid"),
])
def test_sample_py_input_errors(trained_run: Path, tmp_path: Path, args: list[str], message: str):
    (tmp_path / "a_file").write_text("")
    args = [a.format(run=trained_run, file=tmp_path / "a_file") for a in args]
    result = run_here("sample.py", *args, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert message in line


def test_bad_sample_temperature_fails_cleanly(trained_run: Path, tmp_path: Path):
    result = run_here("sample.py", f"ckpt={trained_run}", "temperature=[1.0,-1]", f"out={tmp_path / 'out'}",
                      cwd=tmp_path)
    assert result.returncode == 2 and "temperature" in result.stderr and not (tmp_path / "out").exists()
