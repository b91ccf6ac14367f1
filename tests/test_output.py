"""What train.py prints: each log line once, no vendor tip, no false FLOPs line, the CPU-preset hint
when a run would be long without a GPU; and sweep job dirs named after what the sweep varies."""

from __future__ import annotations

from pathlib import Path

import torch

from pixelcnn.ops.callbacks import cpu_preset_hint, synced_time
from test_cli import NO_QUALITY, TINY, data_args, run, workdir  # noqa: F401 - workdir is a fixture


def test_each_log_line_is_printed_once_without_tips_or_flops(workdir: Path):
    run_dir = workdir / "outputs" / "quiet"
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(workdir), "trainer.max_epochs=1",
                 f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert printed.count("`Trainer.fit` stopped: `max_epochs=1` reached.") == 1
    assert printed.count("GPU available:") == 1
    assert (run_dir / "train.log").read_text().count("`Trainer.fit` stopped") == 1  # and it is in the job's log
    assert "Tip:" not in printed and "litlogger" not in printed and "litmodels" not in printed
    assert "FLOPs" not in printed


def test_sweep_job_dirs_are_named_after_the_swept_parameters_only(workdir: Path):
    sweep = workdir / "multirun-names"
    result = run("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), "trainer.max_epochs=1",
                 "trainer.limit_train_batches=1", "sample.every_n_epochs=0", "optim.lr=1e-3,2e-3",
                 "model.residual_blocks=0,1", f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        "0_model.residual_blocks=0,optim.lr=0.001", "1_model.residual_blocks=0,optim.lr=0.002",
        "2_model.residual_blocks=1,optim.lr=0.001", "3_model.residual_blocks=1,optim.lr=0.002"]
    # TINY sets model.residual_blocks=1 first: the sweep's value list takes its place (Hydra's job order).


def test_a_long_run_without_a_gpu_names_the_cpu_preset():
    hint = cpu_preset_hint(6.1 * 3600, has_gpu=False)  # the seed defaults on 2 CPU cores
    assert hint is not None and hint.count("\n") == 0 and "experiment=quick" in hint
    assert cpu_preset_hint(6.1 * 3600, has_gpu=True) is None
    assert cpu_preset_hint(29 * 60, has_gpu=False) is None  # short enough as it is
    assert cpu_preset_hint(None, has_gpu=False) is None  # no epoch limit: no estimate to judge
    assert cpu_preset_hint(6.1 * 3600, has_gpu=False, preset="quick") is None  # a preset was chosen: no advice


def test_the_run_time_estimate_waits_for_a_gpus_queued_work(monkeypatch):
    """A GPU (CUDA, or MPS on a Mac) runs asynchronously: each timing mark waits for its queued work first, or the
    estimate would time the queueing; a CPU has nothing queued."""
    synced = []
    monkeypatch.setattr(torch.accelerator, "synchronize", synced.append)
    for kind in ("cpu", "cuda", "mps"):
        assert isinstance(synced_time(torch.device(kind)), float)
    assert [device.type for device in synced] == ["cuda", "mps"]
