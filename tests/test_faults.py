"""The fault suite (`pytest -m faults`): what a hostile or clumsy user, or a crash, does to the
commands, each run on tiny fake data: a run killed with a real signal resumes bit for bit; files from
others never run code; nothing the run did not create is deleted or overwritten; every bad input is one
`error:` line with exit status 2. A run that trains is a real process (`commands.run`); a command refused
before it trains runs in this one (`commands.run_here`: the same status and output, without ~6 s of imports)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from commands import run, run_here
from fakes import write_dataset
from pixelcnn.ops.callbacks import RunDirCheckpoint
from pixelcnn.ops.checkpoints import SAVED_DATA_KEYS
from pixelcnn.ops.rules import PATH_KEYS, validate
from pixelcnn.ops.errors import UserError
from pixelcnn.data import BatchLoader
from pixelcnn.commands.train import record_job_failure, sweep_job_dir
from pixelcnn.ops.final_config import absolute_paths
from pixelcnn.ops.run_dirs import fresh_dir, hold_run_dir
from test_cli import data_args

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
KILL_SHIM = Path(__file__).resolve().parent / "kill_shim"
# 80 training images in batches of 16: 5 optimizer steps per epoch; a gated model with dropout and
# hflip, so that resuming exactly needs the loader's generator and the global RNG as well.
TINY = [
    "model=gated", "model.channels=8", "model.layers=1", "model.dropout=0.3", "data.hflip=true",
    "data.batch_size=16", "data.eval_batch_size=20", "data.val_size=20", "data.download=false",
    "sample.every_n_epochs=2", "sample.n=4", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "quality_n=0",
]
EPOCHS = ["trainer.max_epochs=4", "checkpoint_every_n_steps=4"]  # step.ckpt at steps 4, 8, 12, 16, 20


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults")
    write_dataset(path / "data", n_train=100, n_test=20)
    return path


@pytest.fixture(scope="module")
def reference(work: Path) -> Path:
    """An uninterrupted run: the result every interrupted-and-resumed run must reproduce exactly."""
    run_dir = work / "reference"
    result = run("train.py", *TINY, *EPOCHS, *data_args(work), f"hydra.run.dir={run_dir}", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def kill_env(step: int, signal_name: str = "SIGKILL") -> dict[str, str]:
    """The environment that makes train.py send itself `signal_name` once `step` optimizer steps are done."""
    return {"PYTHONPATH": os.pathsep.join([str(KILL_SHIM), os.environ.get("PYTHONPATH", "")]),
            "PIXELCNN_KILL_AT_STEP": str(step), "PIXELCNN_KILL_SIGNAL": signal_name}


def assert_same_training(a: Path, b: Path) -> None:
    """Final weights and optimizer state of two runs are equal, bit for bit."""
    first, second = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for d in (a, b))
    assert (first["epoch"], first["global_step"]) == (second["epoch"], second["global_step"])
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), name
    optim_a, optim_b = first["optimizer_states"][0]["state"], second["optimizer_states"][0]["state"]
    assert optim_a.keys() == optim_b.keys()
    for index, state in optim_a.items():
        for name, value in state.items():
            assert torch.equal(value, optim_b[index][name]), (index, name)


# --- killed runs resume exactly -------------------------------------------------------------------
@pytest.mark.parametrize("signal_name, kill_at, resumes_from", [
    ("SIGKILL", 13, "step.ckpt"),  # mid-epoch 3 of 4: from the step-12 checkpoint, 2 of 5 batches done
    ("SIGINT", 13, "step.ckpt"),  # Ctrl-C: Lightning shuts down; the run resumes the same way
    ("SIGKILL", 11, "last.ckpt"),  # just after an epoch's end: from last.ckpt (step 10)
])
def test_killed_run_resumes_bit_for_bit(work: Path, reference: Path, tmp_path: Path, signal_name: str, kill_at: int,
                                        resumes_from: str):
    run_dir = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(KILL_SHIM), os.environ.get("PYTHONPATH", "")]),
           "PIXELCNN_KILL_AT_STEP": str(kill_at), "PIXELCNN_KILL_SIGNAL": signal_name}
    killed = run("train.py", *TINY, *EPOCHS, *data_args(work), f"hydra.run.dir={run_dir}", cwd=work, env=env)
    expected = -signal.SIGKILL if signal_name == "SIGKILL" else 1  # Lightning exits 1 after a KeyboardInterrupt
    assert killed.returncode == expected, killed.stderr[-2000:]
    assert not (run_dir / "metrics.json").exists()
    resumed = run("train.py", f"ckpt_path={run_dir}", cwd=work)  # the run dir alone: its overrides are re-applied
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{resumes_from}" in resumed.stdout + resumed.stderr
    assert_same_training(reference, run_dir)


def test_resume_after_an_epoch_cut_by_limit_train_batches(work: Path, tmp_path: Path):
    """Killed while validating after the epoch's last batch (4 of 5 batches taken, limit_train_batches=4),
    where a step checkpoint was due (step 8): it waits for the epoch's end, so the resume continues
    from the one of step 6, runs that validation and starts the next epoch, as the uninterrupted run."""
    args = [*TINY, *EPOCHS, *data_args(work), "trainer.limit_train_batches=4", "checkpoint_every_n_steps=2"]
    whole = run("train.py", *args, f"hydra.run.dir={tmp_path / 'whole'}", cwd=work)
    assert whole.returncode == 0, whole.stderr[-3000:]
    env = {"PYTHONPATH": os.pathsep.join([str(KILL_SHIM), os.environ.get("PYTHONPATH", "")]),
           "PIXELCNN_KILL_AT_STEP": "8"}
    assert run("train.py", *args, f"hydra.run.dir={tmp_path / 'killed'}", cwd=work, env=env).returncode == -signal.SIGKILL
    resumed = run("train.py", f"ckpt_path={tmp_path / 'killed'}", cwd=work)
    assert resumed.returncode == 0 and "step.ckpt" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert_same_training(tmp_path / "whole", tmp_path / "killed")


def test_repeated_kills_resume_bit_for_bit(work: Path, reference: Path, tmp_path: Path):
    """Killed again and again, each time right after a checkpoint write or at an epoch's end, and
    resumed each time: the result is the uninterrupted run's, bit for bit (issue 15). step.ckpt is
    written at every step (5 per epoch, 20 in all). The first kill is at an epoch's last batch,
    before its validation and last.ckpt; a fixed seed picks a later point of the next epoch; the
    last is a SIGTERM at the following epoch's last batch (saved at that epoch's end)."""
    rng = random.Random(15)
    kills = [(10, "SIGKILL"), (rng.choice([11, 12, 13, 14]), "SIGKILL"), (15, "SIGTERM")]
    run_dir = tmp_path / "run"
    args = [*TINY, *EPOCHS, "checkpoint_every_n_steps=1", *data_args(work), f"hydra.run.dir={run_dir}"]
    for step, signal_name in kills:
        killed = run("train.py", *args, cwd=work, env=kill_env(step, signal_name))
        expected = -signal.SIGKILL if signal_name == "SIGKILL" else 143
        assert killed.returncode == expected, (kills, step, killed.stderr[-2000:])
        args = [f"ckpt_path={run_dir}"]
    resumed = run("train.py", *args, cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training(reference, run_dir)


def test_sigterm_saves_at_the_next_step_and_resumes_bit_for_bit(work: Path, reference: Path, tmp_path: Path):
    """SIGTERM (a scheduler's preemption) in the middle of an epoch, without step checkpoints
    configured: the run saves step.ckpt at the next step boundary, says how to resume in one line,
    exits 143; the resumed run is the uninterrupted one, bit for bit."""
    run_dir = tmp_path / "run"
    stopped = run("train.py", *TINY, "trainer.max_epochs=4", *data_args(work), f"hydra.run.dir={run_dir}", cwd=work,
                  env=kill_env(13, "SIGTERM"))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    [line] = [x for x in stopped.stdout.splitlines() if "SIGTERM" in x]
    assert "optimizer step 14" in line and f"python train.py ckpt_path={run_dir}" in line
    assert torch.load(run_dir / "checkpoints" / "step.ckpt", weights_only=True, mmap=True)["global_step"] == 14
    assert not (run_dir / "metrics.json").exists()
    resumed = run("train.py", f"ckpt_path={run_dir}", cwd=work)
    assert resumed.returncode == 0 and "step.ckpt" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert_same_training(reference, run_dir)


def test_with_gradient_accumulation_step_checkpoints_wait_for_the_optimizer_step(work: Path, tmp_path: Path):
    """trainer.accumulate_grad_batches=2 (5 batches an epoch: steps after batches 2, 4 and 5): a step
    checkpoint or a SIGTERM save waits for the end of the accumulation group, whose gradients no checkpoint
    holds, so that step.ckpt is always an optimizer step's state and the resume is the uninterrupted run."""
    args = [*TINY, "trainer.max_epochs=3", "trainer.accumulate_grad_batches=2", "checkpoint_every_n_steps=1",
            *data_args(work)]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    straight = run("train.py", *args, f"hydra.run.dir={reference}", cwd=work)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # SIGTERM at the end of step 4's group (epoch 2, batch 2): the next batch starts a group and has no step
    stopped = run("train.py", *args, f"hydra.run.dir={run_dir}", cwd=work, env=kill_env(4, "SIGTERM"))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "optimizer step 5" in stopped.stdout, stopped.stdout[-2000:]
    assert torch.load(run_dir / "checkpoints" / "step.ckpt", weights_only=True, mmap=True)["global_step"] == 5
    resumed = run("train.py", f"ckpt_path={run_dir}", cwd=work)
    assert resumed.returncode == 0 and "step.ckpt" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    assert_same_training(reference, run_dir)


def test_a_weight_average_resumes_bit_for_bit_after_sigterm_then_sigkill(work: Path, tmp_path: Path):
    """model.ema_decay: SIGTERM mid-epoch (step.ckpt at the next step), then SIGKILL of the resumed run
    after a later step.ckpt, then a resume to the end: the average, the raw weights and the average's own
    state equal an uninterrupted run's, bit for bit."""
    args = [*TINY, *EPOCHS, "model.ema_decay=0.9", *data_args(work)]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    straight = run("train.py", *args, f"hydra.run.dir={reference}", cwd=work)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run("train.py", *args, f"hydra.run.dir={run_dir}", cwd=work, env=kill_env(13, "SIGTERM"))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    killed = run("train.py", f"ckpt_path={run_dir}", cwd=work, env=kill_env(17))  # after step.ckpt at 16
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run("train.py", f"ckpt_path={run_dir}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training(reference, run_dir)  # the average (state_dict) and the optimizer
    first, second = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (reference, run_dir))
    for key in ("current_model_state", "averaging_state"):
        assert first[key].keys() == second[key].keys()
        for name, tensor in first[key].items():
            assert torch.equal(tensor, second[key][name]), (key, name)


def slurm_job_env(bin_dir: Path, restart_count: int | None = None) -> dict[str, str]:
    """What srun gives a one-task job (so that Lightning's SLURMEnvironment takes it, with its requeue
    signal SIGUSR1), with a `scontrol` on PATH that only records its arguments in bin_dir/scontrol.log."""
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {bin_dir / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    env = {"PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    return {**env, "SLURM_RESTART_COUNT": str(restart_count)} if restart_count is not None else env


def test_slurm_requeue_signal_saves_at_the_next_step_and_the_requeued_job_continues_bit_for_bit(
        work: Path, reference: Path, tmp_path: Path):
    """Under SLURM (srun), Lightning's requeue signal mid-epoch: the run saves step.ckpt at the next
    step boundary (and Lightning's hpc checkpoint, there too), says so in one line, has Lightning call
    `scontrol requeue` and exits non-zero. SLURM then runs the same command line again, as the same job
    (SLURM_RESTART_COUNT=1): it continues in its run dir from that checkpoint, bit for bit."""
    run_dir, bin_dir = tmp_path / "run", tmp_path / "bin"
    args = [*TINY, "trainer.max_epochs=4", *data_args(work), f"hydra.run.dir={run_dir}"]
    stopped = run("train.py", *args, cwd=work, env={**slurm_job_env(bin_dir), **kill_env(13, "SIGUSR1")})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    [line] = [x for x in stopped.stdout.splitlines() if "SIGUSR1" in x]
    assert "(SLURM requeue) at optimizer step 14" in line and str(run_dir) in line, line
    assert (bin_dir / "scontrol.log").read_text().split() == ["requeue", "4242"]
    for path in (run_dir / "checkpoints" / "step.ckpt", run_dir / "hpc_ckpt_1.ckpt"):  # at the same step boundary
        assert torch.load(path, weights_only=True, mmap=True)["global_step"] == 14, path
    requeued = run("train.py", *args, cwd=work, env=slurm_job_env(bin_dir, restart_count=1))
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"SLURM requeued this job (SLURM_RESTART_COUNT=1): continuing its run in {run_dir}" in requeued.stdout
    assert_same_training(reference, run_dir)


def test_requeues_keep_one_hpc_checkpoint_and_the_test_scores_the_final_weights(work: Path, tmp_path: Path):
    """Each requeue signal has Lightning save another hpc_ckpt_<N>.ckpt, unused (step.ckpt is the resume
    point): the run keeps only the newest. Under SLURM, Lightning tests an hpc checkpoint when it is given no
    checkpoint path; a run without a best checkpoint (no validation) tests its final weights (last.ckpt)."""
    run_dir, bin_dir = tmp_path / "run", tmp_path / "bin"
    args = [*TINY, "trainer.max_epochs=2", "+trainer.limit_val_batches=0", *data_args(work), f"hydra.run.dir={run_dir}"]
    first = run("train.py", *args, cwd=work, env={**slurm_job_env(bin_dir), **kill_env(3, "SIGUSR1")})
    assert first.returncode == 143 and (run_dir / "hpc_ckpt_1.ckpt").is_file(), first.stderr[-2000:]
    second = run("train.py", f"ckpt_path={run_dir}", cwd=work, env={**slurm_job_env(bin_dir), **kill_env(6, "SIGUSR1")})
    assert second.returncode == 143, second.stderr[-2000:]
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*")) == ["hpc_ckpt_2.ckpt"]
    assert torch.load(run_dir / "hpc_ckpt_2.ckpt", weights_only=True, mmap=True)["global_step"] == 7  # the next step
    last = run("train.py", *args, cwd=work, env=slurm_job_env(bin_dir, restart_count=1))
    assert last.returncode == 0, last.stderr[-3000:]
    loaded = [line for line in (last.stdout + last.stderr).splitlines() if "Loaded model weights from" in line]
    assert loaded and all(line.endswith(str(run_dir / "checkpoints" / "last.ckpt")) for line in loaded), loaded
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 10


def test_sigterm_in_a_sweep_is_not_done(work: Path, tmp_path: Path):
    """A sweep job holds its dir as a single run does: while it trains (here stopped with SIGSTOP after
    step 2), a resume of its job dir is refused in one line and writes nothing. Then SIGTERM stops the
    sweep: it exits 143 and lists the stopped job as failed, not done."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", **kill_env(2, "SIGSTOP")}
    holder = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *TINY, "trainer.max_epochs=1",
                               *data_args(work), "optim.lr=1e-3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(holder.pid, os.WUNTRACED)  # returns once it has stopped itself
        assert os.WIFSTOPPED(status), status
        [job] = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
        before = {p: p.stat().st_mtime_ns for p in job.rglob("*")}
        line = one_error_line(run_here("train.py", f"ckpt_path={job}", cwd=work))
        assert "is in use" in line and f"pid {holder.pid}" in line, line
        assert {p: p.stat().st_mtime_ns for p in job.rglob("*")} == before
        holder.send_signal(signal.SIGTERM)  # handled once it runs again
        holder.send_signal(signal.SIGCONT)
        stdout, stderr = holder.communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == 143, stderr[-2000:]
    assert f"ckpt_path={job}" in stdout and not (job / "metrics.json").exists()
    summary = (sweep / "summary.md").read_text()
    assert "0 ok, 1 failed" in summary, summary


def test_a_sweep_job_whose_dir_is_held_fails_without_writing_there(tmp_path: Path, capsys):
    """A sweep job that finds its dir held by another process (a resume of it, when SLURM requeues the
    job meanwhile) does not train and fails in one line, without writing its failure into that dir."""
    job_dir = tmp_path / "0_optim.lr=0.001"
    holder = hold_run_dir(job_dir, "the other run")
    try:
        with record_job_failure(job_dir, 0), sweep_job_dir(OmegaConf.create({"output_dir": str(job_dir)})):
            raise AssertionError("the job trained")
    finally:
        os.close(holder)
    assert [p.name for p in job_dir.iterdir()] == [".lock"]
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: job 0 failed: the job dir {job_dir} is in use"), line


def test_run_dir_in_use_is_refused_and_a_killed_holder_leaves_no_lock(work: Path, reference: Path, tmp_path: Path):
    """While a run trains in its dir (here stopped with SIGSTOP after step 6), a resume of it is
    refused in one line and writes nothing; once that run is SIGKILLed, the resume works (the OS
    released the lock) and ends where the uninterrupted run does."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", **kill_env(6, "SIGSTOP")}
    holder = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, *EPOCHS, *data_args(work),
                               f"hydra.run.dir={run_dir}"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _, status = os.waitpid(holder.pid, os.WUNTRACED)  # returns once it has stopped itself
        assert os.WIFSTOPPED(status), status
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
        line = one_error_line(run_here("train.py", f"ckpt_path={run_dir}", cwd=work))
        assert "is in use" in line and f"pid {holder.pid}" in line, line
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    finally:
        holder.kill()
        holder.wait()
    resumed = run("train.py", f"ckpt_path={run_dir}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training(reference, run_dir)


def test_a_lock_file_that_is_a_link_is_refused_not_followed(tmp_path: Path):
    """A copied run dir whose .lock is a symbolic link: the pid was written into the file it points to."""
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(precious)
    with pytest.raises(UserError, match=f"^ckpt_path=x cannot be locked for this run \\({tmp_path / 'run' / '.lock'}: "):
        hold_run_dir(tmp_path / "run", "ckpt_path=x")
    assert precious.read_text() == "mine"


@pytest.mark.parametrize("edit, script, message", [
    # The shipped weights and any exported ones: no optimizer or loop state, which Lightning's fit needs to resume.
    (lambda c: [c.pop("optimizer_states"), c.pop("lr_schedulers")], "train.py ckpt_path",
     "holds weights only (no optimizer or loop state to continue): start a new run from them with init_from="),
    (lambda c: c["state_dict"].popitem(), "train.py init_from", "is damaged: its hyperparameters do not match its "
                                                                 "weights (Missing key(s) in state_dict:"),
    (lambda c: c["state_dict"].update(bogus=torch.zeros(1)), "train.py ckpt_path", "is damaged: its hyperparameters "
                                                                                   "do not match its weights"),
    (lambda c: c["hyper_parameters"].update(channels=16), "train.py init_from", "do not match its weights"),
])
def test_a_checkpoint_a_run_cannot_continue_or_start_from_is_one_line(reference: Path, work: Path, tmp_path: Path,
                                                                      edit, script: str, message: str):
    """Were unforeseen errors, raised by Lightning's fit or load_state_dict after the run had started."""
    checkpoint = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    edit(checkpoint)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, tmp_path / "run" / "checkpoints" / "last.ckpt")
    command, key = script.split()
    result = run_here(command, *TINY, *EPOCHS, *data_args(work), f"{key}={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                      f"hydra.run.dir={tmp_path / 'new'}", cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith(f"error: {key}={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} ") and message in line, line
    assert not (tmp_path / "new").exists() and sorted(p.name for p in (tmp_path / "run").rglob("*")) == [
        "checkpoints", "last.ckpt"]


def test_a_checkpoint_of_16_bit_weights_loads_in_fp32_for_sampling(work: Path, tmp_path: Path):
    """A trainer.precision=bf16-true run saves bf16 weights: sample.py and evaluate.py load them into their fp32
    model (reading the file to check it leaves its tensors as they are), whose masks and inputs are fp32."""
    from pixelcnn.ops.checkpoints import load_module

    result = run_here("train.py", *TINY, *data_args(work), "trainer.max_epochs=1", "quality_n=0",
                      "trainer.precision=bf16-true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    module = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert module.sample(2, method="naive").shape == (2, 16, 16)


def test_batch_loader_state_continues_the_epoch_and_the_next():
    """A loader restored from `state_dict` mid-epoch hands out the rest of that epoch, then the
    next epochs, exactly as the original (order and flips)."""
    images = torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2).repeat(1, 1, 1, 2)  # (10, 1, 2, 4)
    labels = torch.arange(10)

    def loader() -> BatchLoader:
        return BatchLoader(images, labels, 2, shuffle=True, hflip=True, seed=3)

    def flat(items) -> list[torch.Tensor]:
        return [item[0] for item in items]

    original = loader()
    epoch = iter(original)
    next(epoch)
    state = original.state_dict()
    expected = flat(list(epoch) + list(original) + list(original))  # rest of epoch 1, epochs 2 and 3
    restored = loader()
    restored.load_state_dict(state)
    got = flat(list(restored) + list(restored) + list(restored))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_finished_run_is_left_alone(work: Path, reference: Path):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    result = run_here("train.py", f"ckpt_path={reference}", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "has already finished" in result.stdout and "nothing was changed" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before
    # A bad run length on that resume is named, as on any run (it was compared with the checkpoint unchecked:
    # max_time=abc was an unforeseen TypeError, max_epochs=0 "finished").
    for bad, message in (("trainer.max_time=abc", "trainer.max_time='abc' is invalid"),
                         ("trainer.max_epochs=0", "trainer.max_epochs=0 is invalid")):
        line = one_error_line(run_here("train.py", f"ckpt_path={reference}", bad, cwd=work))
        assert line.startswith(f"error: {message}")
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before


def test_run_ended_by_max_time_is_left_alone(work: Path, tmp_path: Path):
    run_dir = tmp_path / "timed"
    args = [*TINY, *data_args(work), "trainer.max_epochs=100000", "trainer.max_time=00:00:00:02",
            "sample.every_n_epochs=0", f"hydra.run.dir={run_dir}"]
    assert run("train.py", *args, cwd=tmp_path).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    result = run("train.py", f"ckpt_path={run_dir}", cwd=tmp_path)
    assert result.returncode == 0 and "trainer.max_time=00:00:00:02" in result.stdout, result.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_moved_run_dir_resumes_from_its_own_files(work: Path, reference: Path, tmp_path: Path):
    moved = tmp_path / "moved"
    shutil.copytree(reference, moved)
    hidden = reference.with_name("reference-hidden")
    reference.rename(hidden)  # the original is gone while the copy resumes
    try:
        result = run("train.py", f"ckpt_path={moved}", "trainer.max_epochs=5", cwd=work)
    finally:
        hidden.rename(reference)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((moved / "metrics.json").read_text())
    assert metrics["epochs"] == 5 and metrics["val_bpd"] == metrics["val_bpd"]  # not NaN
    assert Path(metrics["best_checkpoint"]).parent == (moved / "checkpoints").resolve()


def test_moved_run_dir_keeps_its_best_checkpoint_record(tmp_path: Path):
    """What the resumed run knows of its best checkpoint so far survives the move (Lightning's
    ModelCheckpoint drops it when the folder changed: a worse later epoch would become "best")."""
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    best = str(old / "best-epoch001-val_bpd0.5000.ckpt")
    callback = RunDirCheckpoint(dirpath=new, monitor="val/bpd", mode="min", save_last=True)
    callback.load_state_dict({"monitor": "val/bpd", "dirpath": str(old), "best_model_score": torch.tensor(0.5),
                              "best_model_path": best, "kth_best_model_path": best, "kth_value": torch.tensor(0.5),
                              "best_k_models": {best: torch.tensor(0.5)}, "last_model_path": str(old / "last.ckpt")})
    moved_best = str(Path(callback.dirpath) / Path(best).name)
    assert callback.best_model_score == 0.5 and callback.best_model_path == moved_best
    assert list(callback.best_k_models) == [moved_best] and callback.last_model_path == str(Path(callback.dirpath) / "last.ckpt")


# --- files from others never run code ----------------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_never_runs(work: Path, tmp_path: Path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = {"hyper_parameters": {"arch": "pixelcnn", "levels": 4}, "state_dict": {}, "epoch": 0, "x": Payload(marker)}
    downloads, run_dir = tmp_path / "downloads", tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    downloads.mkdir()
    torch.save(evil, downloads / "model.ckpt")
    torch.save(evil, run_dir / "checkpoints" / "last.ckpt")
    for script, arg in (("sample.py", f"ckpt={downloads / 'model.ckpt'}"),
                        ("evaluate.py", f"ckpt={downloads / 'model.ckpt'}"),
                        ("train.py", f"ckpt_path={downloads / 'model.ckpt'}"),
                        ("train.py", f"ckpt_path={run_dir}")):  # resuming a run dir someone sent
        result = run_here(script, arg, *(data_args(work) if script == "train.py" else []), cwd=tmp_path)
        assert not marker.exists(), f"{script} ran the checkpoint's code"
        assert "could run code" in one_error_line(result), script
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "downloads", "last.ckpt", "model.ckpt", "run"]


def test_a_run_dir_from_someone_else_never_runs_code(work: Path, reference: Path, tmp_path: Path):
    """Every file a resume reads from a run dir (.hydra/config.yaml, hydra.yaml, overrides.yaml,
    metrics.json, the checkpoints' hyperparameters) holds something that would create a marker if
    it were imported, instantiated or resolved: the resume only takes this project's own values."""
    marker, made_dir = tmp_path / "PAYLOAD_RAN", tmp_path / "RESOLVER_RAN"
    run_dir = tmp_path / "sent"
    shutil.copytree(reference, run_dir)
    hydra_dir = run_dir / ".hydra"
    touch = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    config = yaml.safe_load((hydra_dir / "config.yaml").read_text())
    config["model"].update(_target_="os.system", _args_=[f"touch {marker}"])  # instantiate(cfg.model) would run it
    config["data"]["_target_"] = "os.system"
    config["seed"] = f"${{fresh_dir:{made_dir}}}"  # a resolver that creates a folder
    config["sample"]["every_n_epochs"] = "${oc.env:HOME}"
    config["evil"], config["hydra"] = touch, {"callbacks": {"evil": touch}}
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(config))
    hydra_record = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())
    hydra_record["hydra"]["callbacks"] = {"evil": touch}
    hydra_record["hydra"]["runtime"]["choices"].update({"data": "../../sent/evil", "hydra/launcher": "evil",
                                                        "experiment": "quick,best", "evil": "x"})
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(hydra_record))
    (run_dir / "sent").mkdir()
    (run_dir / "sent" / "evil.yaml").write_text(yaml.safe_dump(touch))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(
        ["+hydra.callbacks.evil._target_=os.system", f"+hydra.callbacks.evil._args_=[touch {marker}]",
         "model._target_=os.system"]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "epochs": f"$(touch {marker})"}))
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["hyper_parameters"].update(_target_="os.system", _args_=[f"touch {marker}"])
        torch.save(checkpoint, path)
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", tmp_path / "payload.ckpt")
    result = run("train.py", f"ckpt_path={run_dir}", "trainer.max_epochs=5", cwd=tmp_path)
    assert not marker.exists() and not made_dir.exists()
    assert result.returncode == 0, result.stderr[-3000:]
    [ignored] = [line for line in result.stdout.splitlines() if line.startswith("[pixelcnn] ignored in")]
    assert all(key in ignored for key in ("model._target_", "model._args_", "data._target_", "seed", "evil"))
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 5
    line = one_error_line(run_here("sample.py", f"ckpt={tmp_path / 'payload.ckpt'}", cwd=tmp_path))
    assert "is not an option of model.arch=gated" in line
    for record in hydra_dir.rglob("config.yaml"):  # the first one and the resume's (the one read: the newest)
        record.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    line = one_error_line(run_here("train.py", f"ckpt_path={run_dir}", cwd=tmp_path))
    assert "cannot be read as a saved config" in line
    assert not marker.exists() and not made_dir.exists()


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_its_dir(work: Path, reference: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(KILL_SHIM), os.environ.get("PYTHONPATH", "")]),
           "PIXELCNN_KILL_AT_STEP": "1"}
    killed = run("train.py", *TINY, *EPOCHS, *data_args(work), f"hydra.run.dir={run_dir}", cwd=work, env=env)
    assert killed.returncode == -signal.SIGKILL and not list(run_dir.rglob("*.ckpt"))
    line = one_error_line(run_here("train.py", *TINY, *EPOCHS, *data_args(work), f"hydra.run.dir={run_dir}", cwd=work))
    assert f"ckpt_path={run_dir}" in line  # the way forward it names is the one below
    resumed = run("train.py", f"ckpt_path={run_dir}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "has no checkpoint (it stopped before its first one): training it from the start" in resumed.stdout
    assert_same_training(reference, run_dir)  # its saved config, from step 0: the uninterrupted run exactly
    assert (run_dir / ".hydra" / "config.yaml").is_file() and list((run_dir / ".hydra").glob("resume-*/config.yaml"))


def test_truncated_checkpoint_and_cache(work: Path, reference: Path, tmp_path: Path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((reference / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    for script, key in (("sample.py", "ckpt"), ("evaluate.py", "ckpt"), ("train.py", "ckpt_path")):
        assert "truncated" in one_error_line(run_here(script, f"{key}={truncated}", cwd=tmp_path)), script
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    cache = data / "fashion_mnist_16px_4lv.pt"
    cache.write_bytes(cache.read_bytes()[:1000])  # a run killed while writing it (before the atomic rename existed)
    result = run("train.py", *TINY, "trainer.max_epochs=1", f"data.root={data}", f"data.system_dir={tmp_path / 'none'}",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(cache, weights_only=True)["train_images"].shape[0] == 100  # rebuilt from the IDX files


# --- run dirs: never shared, never deleted, never mixed ----------------------------------------------
def test_two_runs_in_the_same_second_get_their_own_dirs(work: Path, tmp_path: Path):
    """Both runs ask for the same name (what two runs started in the same second get from the
    default `outputs/<date>/<time>`), through the default config's own resolver."""
    same_name = "hydra.run.dir='${resume_run_dir:${ckpt_path},outputs/same-second}'"
    args = [*TINY, "trainer.max_epochs=1", *data_args(work), same_name]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    dirs = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert dirs == ["same-second", "same-second_1"]
    for name in dirs:
        assert (tmp_path / "outputs" / name / "metrics.json").is_file()
        assert len(list((tmp_path / "outputs" / name / "checkpoints").glob("last*.ckpt"))) == 1


def test_fresh_dir_never_hands_out_a_name_twice(tmp_path: Path):
    with ProcessPoolExecutor(2) as pool:
        names = list(pool.map(fresh_dir, [str(tmp_path / "run")] * 12))
    assert len(set(names)) == 12 and all(Path(n).is_dir() for n in names)


def test_sweep_dir_is_reserved_once_for_all_jobs(work: Path, tmp_path: Path):
    result = run("train.py", "-m", *TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=1", *data_args(work),
                 "optim.lr=1e-3,2e-3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [day] = (tmp_path / "multirun").iterdir()
    [sweep] = day.iterdir()  # one sweep dir holding both jobs and the summary
    assert (sweep / "summary.md").is_file() and len([p for p in sweep.iterdir() if p.is_dir()]) == 2
    assert not (tmp_path / "outputs").exists()  # no stray run dir reserved by a multirun


@pytest.mark.parametrize("subdir", ["null", "meta"])
def test_a_sweep_without_its_jobs_records_is_refused(work: Path, tmp_path: Path, subdir: str):
    """hydra.output_subdir=null (or another folder) in a sweep: its summary would list 0 jobs (it reads each job's
    .hydra record) and exit 0 whatever failed; one line instead, before the sweep dir is made."""
    line = one_error_line(run_here("train.py", "-m", *TINY, *data_args(work), f"hydra.output_subdir={subdir}",
                                   "optim.lr=1e-3,2e-3", cwd=tmp_path))
    assert f"hydra.output_subdir={subdir}" in line and "summary" in line and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("subdir, resume", [("meta", False), (".hydra", True), ("meta", True)])
def test_a_run_record_elsewhere_than_hydra_is_refused(work: Path, reference: Path, tmp_path: Path, subdir: str,
                                                       resume: bool):
    """A record in another folder left a resume of the run without its settings; a resume's record in .hydra/
    replaced the run's own. Refused in one line, nothing written."""
    shutil.copytree(reference, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    args = [f"ckpt_path={tmp_path / 'run'}", "trainer.max_epochs=9"] if resume else [
        *TINY, *data_args(work), f"hydra.run.dir={tmp_path / 'new'}"]
    line = one_error_line(run_here("train.py", *args, f"hydra.output_subdir={subdir}", cwd=tmp_path))
    assert line.startswith(f"error: hydra.output_subdir={subdir} is not a setting here: a run keeps its record in "
                           ".hydra/")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists()


# hydra.output_subdir=null (Hydra's knob for no .hydra record) leaves out the record, not the run dir's checks.
NO_RECORD = pytest.mark.parametrize("record", [[], ["hydra.output_subdir=null"]], ids=["record", "no_record"])


@NO_RECORD
def test_user_files_in_the_run_dir_are_never_deleted(work: Path, tmp_path: Path, record: list[str]):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "notes.log").write_text("x")
    line = one_error_line(run_here("train.py", "data.levels=300", f"hydra.run.dir={folder}", *record, cwd=tmp_path))
    assert "already holds files" in line
    assert sorted(p.name for p in folder.iterdir()) == ["notes.log"] and (folder / "notes.log").read_text() == "x"


@NO_RECORD
def test_finished_run_dir_is_not_reused_by_a_new_run(work: Path, reference: Path, record: list[str]):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    line = one_error_line(run_here("train.py", *TINY, *data_args(work), f"hydra.run.dir={reference}", *record,
                                   cwd=work))
    assert "already holds files" in line and f"ckpt_path={reference}" in line
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before


@pytest.mark.parametrize("args, message", [
    (["ckpt_path={tmp}/missing.ckpt"], "does not exist"),
    (["ckpt_path=3"], "ckpt_path=3 does not exist"),  # a number is a path, also in the run-dir resolver
    (["trainer.limit_train_batches=abc"], "trainer.limit_train_batches='abc' is invalid"),
    (["trainer.limit_train_batches=-1"], "trainer.limit_train_batches=-1 is invalid"),
    (["optim.lr=inf"], "optim.lr=inf is invalid: it must be a finite number"),
    (["data.levels=300"], "data.levels=300 is invalid"),
])
def test_failed_run_leaves_no_run_dir(work: Path, tmp_path: Path, args: list[str], message: str):
    """With the default run dir (outputs/<date>/<time>), which the run itself reserved."""
    args = [a.format(tmp=tmp_path) for a in args]
    assert message in one_error_line(run_here("train.py", *TINY, *data_args(work), *args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []  # not even outputs/<date>/


# --- outputs that cannot be written --------------------------------------------------------------
def unwritable_dirs(tmp_path: Path) -> list[Path]:
    """Folders no one can create, root included: under /proc, and under a plain file. As a user
    (root ignores permissions) also a read-only folder."""
    (tmp_path / "a_file").write_text("")
    dirs = [Path("/proc/forbidden"), tmp_path / "a_file" / "inside"]
    if os.geteuid() != 0:
        (tmp_path / "read_only").mkdir()
        (tmp_path / "read_only").chmod(0o555)
        dirs.append(tmp_path / "read_only" / "out")
    return dirs


def test_unwritable_outputs_are_refused_before_any_work(work: Path, reference: Path, tmp_path: Path):
    for i, folder in enumerate(unwritable_dirs(tmp_path)):
        commands = [("train.py", [*TINY, *data_args(work), f"hydra.run.dir={folder}"])]
        if i == 0:  # the same check (config.check_out_dir) serves every output key: each command once
            commands += [("sample.py", [f"ckpt={reference}", f"out={folder}"]),
                         ("evaluate.py", [f"ckpt={reference}", f"out={folder}", f"data_root={work / 'data'}"])]
        for script, args in commands:
            started = time.perf_counter()
            line = one_error_line(run_here(script, *args, cwd=tmp_path))
            assert str(folder) in line or str(folder.parent) in line, (script, line)
            assert time.perf_counter() - started < 60


def test_read_only_run_dir_on_resume_is_one_line(work: Path, reference: Path, tmp_path: Path):
    """A run dir that became unwritable (here: its checkpoints folder replaced by a file is not
    possible to resume; a read-only mount is simulated for non-root users with chmod)."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the unwritable cases root cannot write are tested above")
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    for path in [copy, *copy.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        line = one_error_line(run_here("train.py", f"ckpt_path={copy}", "trainer.max_epochs=5", cwd=tmp_path))
        assert str(copy) in line
    finally:
        for path in [copy, *copy.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


# --- bad values: the whole class of each -----------------------------------------------------------
def float_keys(cfg, kind: type = float) -> list[str]:
    container = OmegaConf.to_container(cfg, resolve=False)
    keys = []

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(node, kind) and not isinstance(node, bool):
            keys.append(prefix.rstrip("."))

    walk("", {k: v for k, v in container.items() if k != "hydra"})
    return keys


@pytest.mark.parametrize("config", ["train", "entry/sample", "entry/evaluate", "entry/classifier"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_key_rejects_non_finite_values(config: str, value: str):
    config_dir, name = (ROOT / "conf" / config).parent, Path(config).name
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        keys = float_keys(compose(name, overrides=["ckpt=x"] if name in ("sample", "evaluate") else []))
        assert keys  # every config has float keys (lr, temperature, dropout, ...)
        for key in keys:
            overrides = [f"{key}={value}"] + (["ckpt=x"] if name in ("sample", "evaluate") else [])
            with pytest.raises(UserError, match=rf"^{key}=.* it must be a finite number"):
                validate(compose(name, overrides=overrides), name)


@pytest.mark.parametrize("config", ["train", "entry/sample", "entry/evaluate", "entry/classifier", "bench"])
def test_every_path_key_takes_a_number_as_a_path(config: str):
    """Hydra reads `out=2024` as an int: every path key turns it into the folder "2024"."""
    config_dir, name = (ROOT / "conf" / config).parent, Path(config).name
    required = ["ckpt=x"] if name in ("sample", "evaluate") else []  # a later override of ckpt wins
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        keys = [k for k in PATH_KEYS if OmegaConf.select(compose(name, overrides=required), k, default="-") != "-"]
        assert keys
        for key in keys:
            cfg = compose(name, overrides=[*required, f"{key}=2024"])
            validate(cfg, name)
            assert OmegaConf.select(cfg, key) == "2024", key
            with pytest.raises(UserError, match=rf"^{key}=true is invalid: it must be a path"):
                validate(compose(name, overrides=[*required, f"{key}=true"]), name)


def test_every_path_a_run_records_is_absolute(tmp_path: Path, monkeypatch):
    """Every path key of train.py's config (`PATH_KEYS`), as the run records it: from the working directory."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["data=folder", "data.path=pics", "data.root=\"~/cache\"", "init_from=2024",
                                          "ckpt_path=runs/x", "data.system_dir=../elsewhere"])
    assert absolute_paths(cfg) == {"ckpt_path": str(tmp_path / "runs" / "x"), "init_from": str(tmp_path / "2024"),
                                   "data.root": str(Path.home() / "cache"), "data.path": str(tmp_path / "pics"),
                                   "data.system_dir": str(tmp_path.parent / "elsewhere")}


@pytest.mark.parametrize("overrides, message", [
    (["n=1000000000"], "n=1000000000 is invalid"),
    (["scale=100000"], "scale=100000 is invalid"),
    (["completions=1000000"], "completions=1000000 is invalid"),
])
def test_sample_sizes_are_bounded(overrides: list[str], message: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf" / "entry")):
        with pytest.raises(UserError, match=message.replace("[", r"\[")):
            validate(compose("sample", overrides=["ckpt=x", *overrides]), "sample")


@pytest.mark.parametrize("args, message", [
    (["temperature=[0.5,nan]"], "temperature[1]=nan is invalid"),
    (["n=10000", "scale=64"], "megapixel grid"),  # each bound allowed, not both together
])
def test_sample_py_bounds(reference: Path, tmp_path: Path, args: list[str], message: str):
    line = one_error_line(run_here("sample.py", f"ckpt={reference}", f"out={tmp_path / 'out'}", *args, cwd=tmp_path))
    assert message in line and not (tmp_path / "out").exists()


def test_checkpoint_whose_hyperparameters_do_not_fit_its_weights(reference: Path, tmp_path: Path):
    checkpoint = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["channels"] = 16  # the weights have 8
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    for script in ("sample.py", "evaluate.py"):
        line = one_error_line(run_here(script, f"ckpt={tmp_path / 'edited.ckpt'}", cwd=tmp_path))
        assert "do not match its weights" in line


@pytest.mark.parametrize("edit, message", [
    ({"data": {"source": "fashion_mnist", "bogus": 1}}, "its data settings are not a mapping of source, path,"),
    ({"data": ["fashion_mnist"]}, "its data settings are not a mapping"),
    ({"data": {"source": "fashion_mnist", "splits": {"train": 5}}}, "its data.splits={'train': 5} is invalid"),
    ({"data": {"source": "fashion_mnist", "channels": "x"}}, "its data.channels='x' is invalid: it must be one of 1, 3"),
    ({"data": {"source": "array", "path": 7}}, "its data.path=7 is invalid: it must be a path"),
    ({"data": {"source": "fashion_mnist", "val_size": -5}}, "its data.val_size=-5 is invalid"),
    ({"levels": 300}, "its data.levels=300 is invalid: it must be an integer in [2, 256]"),
    ({"image_size": "16"}, "its data.image_size='16' is invalid"),
])
def test_checkpoint_whose_data_settings_are_edited(reference: Path, tmp_path: Path, edit: dict, message: str):
    """A checkpoint's data settings are read from a file: out-of-range values are one line, for both commands
    that read data with them, and nothing is written."""
    checkpoint = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(checkpoint["hyper_parameters"]["data"]) == set(SAVED_DATA_KEYS)  # what training saves
    checkpoint["hyper_parameters"].update(edit)
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    for script in ("sample.py", "evaluate.py"):
        line = one_error_line(run_here(script, f"ckpt={tmp_path / 'edited.ckpt'}", f"out={tmp_path / 'out'}",
                                       cwd=tmp_path))
        assert line.startswith(f"error: ckpt={tmp_path / 'edited.ckpt'} is damaged: {message}"), line
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, choices", [
    (["model=nonexistent"], "gated, pixelcnn"),
    (["experiment=nonexistent"], "best, best_conditional, quick, quick_gated"),
    (["-m", "model=pixelcnn,nonexistent"], "gated, pixelcnn"),
])
def test_unknown_config_option_is_one_line(tmp_path: Path, args: list[str], choices: str):
    for script in ("train.py", "bench.py") if args == ["model=nonexistent"] else ("train.py",):
        line = one_error_line(run_here(script, *args, cwd=tmp_path))
        assert "nonexistent is not an option" in line and choices in line
    assert list(tmp_path.iterdir()) == []


def test_options_of_the_users_own_config_dir_are_taken_as_hydra_takes_them(tmp_path: Path):
    """`--config-dir` (or hydra.searchpath) adds the user's group options; they were refused as not in conf/."""
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "mine.yaml").write_text((ROOT / "conf" / "model" / "pixelcnn.yaml").read_text()
                                                           .replace("residual_blocks: 5", "residual_blocks: 2"))
    for flag in (["--config-dir", str(tmp_path / "mine")], [f"hydra.searchpath=[file://{tmp_path / 'mine'}]"]):
        result = run_here("train.py", *flag, "model=mine", "--cfg", "job", cwd=tmp_path)
        assert result.returncode == 0 and yaml.safe_load(result.stdout)["model"]["residual_blocks"] == 2, result.stderr
        line = one_error_line(run_here("train.py", *flag, "model=nope", "--cfg", "job", cwd=tmp_path))
        assert "Could not find 'model/nope'" in line and "mine" in line  # Hydra's line, with every dir's options


# --- failures no check foresaw: injected at each stage (tests/fail_shim) ---------------------------------
FAIL_SHIM = Path(__file__).resolve().parent / "fail_shim"
# stage -> (the function that fails there, whether the run has saved a checkpoint by then)
STAGES = {
    "compose": ("hydra._internal.config_loader_impl:ConfigLoaderImpl.load_configuration", False),
    "data": ("pixelcnn.training:build_datamodule", False),
    "model": ("pixelcnn.training:build_module", False),
    "logger": ("pixelcnn.training:build_loggers", False),
    "fit": ("lightning:Trainer.fit", False),
    "test": ("lightning:Trainer.test", True),
    "quality": ("pixelcnn.training:quality_metrics", True),
    "summary": ("pixelcnn.ops.reports:write_json", True),
}


def injected_failure_line(result: subprocess.CompletedProcess, target: str) -> None:
    """Exit 1 and one `error:` line, no traceback on the terminal: the traceback is in the file the line names."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout and "Error executing job" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: RuntimeError: injected failure in {target} (unforeseen: its traceback is in "), line
    saved = Path(line.split("its traceback is in ")[1].rstrip(")"))
    assert "Traceback" in saved.read_text() and f"RuntimeError: injected failure in {target}" in saved.read_text()
    saved.unlink()


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_unforeseen_failure_at_any_stage_is_one_line(work: Path, tmp_path: Path, stage: str):
    """A bug anywhere (a RuntimeError at each stage of train.py): one line naming it and the file holding its
    traceback; the run dir is removed if nothing was saved, kept (with its checkpoints) otherwise."""
    target, saves = STAGES[stage]
    result = run("train.py", *TINY, *data_args(work), "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                 "sample.every_n_epochs=0", f"quality_n={30 if stage == 'quality' else 0}", cwd=tmp_path,
                 env={"PYTHONPATH": os.pathsep.join([str(FAIL_SHIM), os.environ.get("PYTHONPATH", "")]),
                      "PIXELCNN_FAIL_AT": target})
    injected_failure_line(result, target)
    if saves:
        [run_dir] = (tmp_path / "outputs").glob("*/*")
        assert any((run_dir / "checkpoints").glob("*.ckpt")), "a run that saved checkpoints is kept, to be resumed"
    else:
        assert list(tmp_path.iterdir()) == []  # no run dir, not even outputs/<date>/


@pytest.mark.parametrize("script", ["sample.py", "evaluate.py"])
def test_an_unforeseen_failure_of_sample_and_evaluate_is_one_line(tmp_path: Path, script: str):
    target = f"pixelcnn.commands.{script.removesuffix('.py')}:load_checkpoint_model"
    result = run(script, f"ckpt={tmp_path}", f"out={tmp_path / 'out'}", cwd=tmp_path,
                 env={"PYTHONPATH": os.pathsep.join([str(FAIL_SHIM), os.environ.get("PYTHONPATH", "")]),
                      "PIXELCNN_FAIL_AT": target})
    injected_failure_line(result, target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["scheduler=cosine"], "error: scheduler is not a key or group of the config: did you mean optim/scheduler=cosine"),
    (["model.lr=1e-3"], "error: model.lr is not a key or group of the config: did you mean optim.lr=1e-3"),
    (["model=gated", "model.filters=8"], "error: model.filters is not a key or group of the config (model=gated)"),
    (["optim.schedulr.name=cosine"], "did you mean optim.scheduler.name=cosine"),
    (["~model.lr"], "error: model.lr is not a key or group of the config: did you mean optim.lr"),
])
def test_an_unknown_key_or_group_names_the_closest_ones(tmp_path: Path, args: list[str], message: str):
    """Hydra's advice (`To append to your config use +scheduler=cosine`) would add a key nothing reads."""
    assert message in one_error_line(run_here("train.py", *args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_key_names_the_closest_ones_in_every_command_and_sweep(tmp_path: Path):
    for script, arg, close in [("sample.py", "temprature=0.5", "temperature=0.5"), ("evaluate.py", "qualty_n=5", "quality_n=5"),
                               ("bench.py", "model.lr=1e-3", "optim.lr=1e-3"), ("train_classifier.py", "epoch=2", "epochs=2")]:
        assert f"did you mean {close}" in one_error_line(run_here(script, arg, cwd=tmp_path))
    result = run_here("train.py", "-m", "model.lr=1e-3,1e-4", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == ("error: job 0 (model.lr=0.001): model.lr is not a key or group of the "
                                             "config: did you mean optim.lr=0.001 or model.arch=0.001 or model=0.001 or "
                                             "model.filters=0.001?")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config", ["train", "entry/sample", "entry/evaluate", "entry/classifier", "bench"])
def test_every_seed_key_is_bounded_to_what_numpy_takes(config: str):
    """Lightning's seed_everything refuses seeds past 2**32 - 1 in a traceback (and torch's generators past
    2**64): every seed key of every command is checked by `validate` (a sweep's pre-check too)."""
    config_dir, name = (ROOT / "conf" / config).parent, Path(config).name
    extra = ["ckpt=x"] if name in ("sample", "evaluate") else []
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        cfg = compose(name, overrides=extra)
        keys = [k for k in float_keys(cfg, int) if k.rsplit(".", 1)[-1].endswith("seed")]
        assert "seed" in keys
        for key in keys:
            validate(compose(name, overrides=[f"{key}={2**32 - 1}", *extra]), name)
            for bad in (2**32, -1):
                with pytest.raises(UserError, match=rf"^{key}={bad} is invalid: it must be an integer in \[0, 4294967295\]"):
                    validate(compose(name, overrides=[f"{key}={bad}", *extra]), name)


def test_an_unforeseen_failure_of_a_sweep_job_is_recorded_and_the_sweep_goes_on(work: Path, tmp_path: Path):
    """Both jobs fail (a RuntimeError in fit): each is one line and a failed metrics.json naming the traceback's file
    (was a traceback on the terminal), the summary lists both, exit 1."""
    target = "lightning:Trainer.fit"
    result = run("train.py", "-m", *TINY, *data_args(work), "trainer.max_epochs=1", "seed=0,1",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                 env={"PYTHONPATH": os.pathsep.join([str(FAIL_SHIM), os.environ.get("PYTHONPATH", "")]),
                      "PIXELCNN_FAIL_AT": target})
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stdout[-3000:]
    lines = result.stderr.strip().splitlines()
    assert [line.split(" (unforeseen")[0] for line in lines[:2]] == [
        f"error: job {n} failed: RuntimeError: injected failure in {target}" for n in (0, 1)]
    for n, line in enumerate(lines[:2]):
        saved = Path(line.split("its traceback is in ")[1].rstrip(")"))
        assert "Traceback" in saved.read_text()
        saved.unlink()
    assert "2 jobs: 0 ok, 2 failed." in (tmp_path / "sweep" / "summary.md").read_text()


# --- a run knows its data and where its files are --------------------------------------------------
FOLDER_RUN = ["data=folder", "data.path=pictures", "model.filters=8", "model.residual_blocks=1", "data.batch_size=8",
              "trainer.max_epochs=1", "trainer.limit_train_batches=2", "sample.every_n_epochs=0", "quality_n=0",
              "trainer.enable_progress_bar=false"]


def write_pngs(folder: Path, count: int, seed: int, start: int = 0) -> None:
    """`count` random 16x16 grey PNGs, numbered from `start`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(start, start + count):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{k:03d}.png")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    """A run trained from envt/ on envt/pictures, a data=folder dataset of 40 images, given as a relative path."""
    work = tmp_path_factory.mktemp("folder_run")
    write_pngs(work / "envt" / "pictures", 40, seed=0)
    result = run("train.py", *FOLDER_RUN, f"data.root={work / 'cache'}", "hydra.run.dir=run", cwd=work / "envt")
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "envt" / "run"


def files_of(run_dir: Path) -> dict[Path, tuple[int, bytes]]:
    """Every file of a run dir (its lock aside: each process that opens the run writes its pid there)."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


@contextmanager
def changed_pictures(pictures: Path, change: str):
    """The run's pictures with 10 more (add) or 5 fewer (delete), put back as they were afterwards."""
    aside = pictures.with_name("aside")
    aside.mkdir()
    try:
        if change == "add":
            write_pngs(pictures, 10, seed=1, start=40)
        for picture in sorted(pictures.iterdir())[:5] if change == "delete" else []:
            picture.rename(aside / picture.name)
        yield
    finally:
        for picture in sorted(pictures.iterdir())[40:] if change == "add" else []:
            picture.unlink()
        for picture in aside.iterdir():
            picture.rename(pictures / picture.name)
        aside.rmdir()


@pytest.mark.parametrize("change", ["add", "delete"])
def test_a_resume_on_changed_data_is_refused(folder_run: Path, tmp_path: Path, change: str):
    """The val/test split would be drawn again and images would move between train and test: one line
    naming the splits that changed (counts before -> now) and init_from= for a new run; nothing written."""
    before = files_of(folder_run)
    with changed_pictures(folder_run.parent / "pictures", change):
        line = one_error_line(run_here("train.py", f"ckpt_path={folder_run}", "trainer.max_epochs=2", cwd=tmp_path))
    counts = "train 32 -> 41 images" if change == "add" else "train 32 -> 28 images"
    assert line.startswith(f"error: ckpt_path={folder_run}") and counts in line, line
    assert f"init_from={folder_run}" in line and files_of(folder_run) == before


def test_evaluate_says_when_the_data_changed(folder_run: Path, tmp_path: Path):
    """evaluate.py (and sample.py mode=complete) read the checkpoint's data again: one line says which splits
    changed, then it scores the data as it is now; on the same data, no such line."""
    args = [f"ckpt={folder_run}", "quality=false", "heatmaps=0"]
    same = run_here("evaluate.py", *args, f"out={tmp_path / 'same'}", cwd=tmp_path)
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr[-2000:]
    checkpoint = torch.load(folder_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]["data"]["splits"]  # as saved before runs recorded their data
    torch.save(checkpoint, tmp_path / "older.ckpt")
    with changed_pictures(folder_run.parent / "pictures", "add"):
        changed = run_here("evaluate.py", *args, f"out={tmp_path / 'eval'}", cwd=tmp_path)
        older = run_here("evaluate.py", f"ckpt={tmp_path / 'older.ckpt'}", *args[1:], f"out={tmp_path / 'older'}",
                         cwd=tmp_path)
    assert changed.returncode == 0 and older.returncode == 0, changed.stderr[-2000:] + older.stderr[-2000:]
    assert "warning" not in older.stderr  # nothing to compare with: it loads and scores as before
    [line] = [line for line in changed.stderr.splitlines() if "warning" in line]
    assert line.startswith("warning: the data changed") and "train 32 -> 41 images" in line, line
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test_images"] == 5


def test_a_resume_from_another_directory_trains_on_the_recorded_data(folder_run: Path, tmp_path: Path):
    """A run trained from envt/ with data.path=pictures, resumed from the folder above, where another
    pictures/ folder is: it continues on envt/pictures, the data it recorded (absolute, in its .hydra record)."""
    work = tmp_path / "envt"
    shutil.copytree(folder_run.parent, work)
    write_pngs(tmp_path / "pictures", 50, seed=3)  # other data at the same relative path
    result = run("train.py", "ckpt_path=envt/run", "trainer.max_epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((work / "run" / ".hydra" / "config.yaml").read_text())
    assert config["data"]["path"] == str(folder_run.parent / "pictures")  # recorded absolute
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert metrics["splits"] == json.loads((folder_run / "metrics.json").read_text())["splits"]
