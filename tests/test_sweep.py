"""Sweeps (`train.py -m`): every job checked before any trains, a failing job recorded while the
others run, a stop at the first non-finite loss, the Optuna search, and what a sweep leaves
behind (summary.md, summary.png, optimization_results.yaml, TensorBoard HPARAMS)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from pixelcnn.callbacks import NonFiniteLossError, StopOnNonFiniteLoss
from pixelcnn.commands.train import failure_reason
from pixelcnn.config import UserError
from pixelcnn.sweep import collect_runs, plot, write_metrics
from test_cli import NO_QUALITY, TINY, data_args, run, workdir  # noqa: F401 - workdir is a fixture

# TINY for the gated model, which hparams_search=optuna searches (its width and depth are searched).
TINY_GATED = [o for o in TINY if not o.startswith(("model.filters", "model.residual_blocks"))]


def jobs_metrics(sweep: Path) -> dict[int, dict]:
    """Job number -> that job's metrics.json."""
    return {run["job"]: json.loads((sweep / run["dir"] / "metrics.json").read_text()) for run in collect_runs(sweep)}


# --- before anything trains ---------------------------------------------------------------------------
def test_bad_jobs_are_listed_before_any_trains(workdir: Path):
    sweep = workdir / "multirun-bad"
    result = run("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), "model.residual_blocks=0,-1,1",
                 "model.lr=1e-3,-2", f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # Jobs in Hydra's order: (0, 1e-3), (0, -2), (-1, 1e-3), (-1, -2), (1, 1e-3), (1, -2).
    assert lines == [
        "error: job 1 (model.residual_blocks=0 model.lr=-2): model.lr=-2 is invalid: it must be a number > 0",
        "error: job 2 (model.residual_blocks=-1 model.lr=0.001): model.residual_blocks=-1 is invalid: it must be an integer >= 0",
        "error: job 3 (model.residual_blocks=-1 model.lr=-2): model.residual_blocks=-1 is invalid: it must be an integer >= 0",
        "error: job 5 (model.residual_blocks=1 model.lr=-2): model.lr=-2 is invalid: it must be a number > 0",
    ]
    assert not sweep.exists()  # nothing trained, no sweep dir


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=pixelcnn,transformer"], "error: job 1 (model.arch=transformer): model.arch='transformer' is unknown"),
    (["model=pixelcnn,gated"], "error: job 1 (model=gated): Could not override 'model.filters'. Key 'filters' is not in struct"),
])
def test_model_constructor_errors_are_found_before_any_trains(workdir: Path, overrides: list[str], message: str):
    sweep = workdir / "multirun-bad-model"
    result = run("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), *overrides, f"hydra.sweep.dir={sweep}",
                 cwd=workdir)
    assert result.returncode == 2 and not sweep.exists()
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(message)


def test_optuna_search_space_ends_are_checked(workdir: Path):
    sweep = workdir / "optuna-bad"
    result = run("train.py", "-m", "hparams_search=optuna", *TINY_GATED, *data_args(workdir), "model.channels=choice(0,8)",
                 "model.dropout=interval(0.0,1.0)", f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 2 and not sweep.exists()
    assert result.stderr.strip().splitlines() == [
        "error: search space choice(0,8) of model.channels, at model.channels=0: model.channels=0 is invalid: "
        "it must be an integer >= 1",
        "error: search space interval(0.0,1.0) of model.dropout, at model.dropout=1.0: model.dropout=1.0 is invalid: "
        "it must be a number in [0, 1)",
    ]


# --- while the jobs run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_with_a_failure(workdir: Path) -> tuple[Path, object]:
    """Three jobs; job 1's learning rate makes the loss non-finite within a few steps."""
    sweep = workdir / "multirun-survives"
    result = run("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), "model.lr=1e-3,1e12,3e-3",
                 f"hydra.sweep.dir={sweep}", cwd=workdir)
    return sweep, result


def test_a_failing_job_is_recorded_and_the_others_run(sweep_with_a_failure):
    sweep, result = sweep_with_a_failure
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    metrics = jobs_metrics(sweep)
    assert metrics[1]["status"] == "failed"
    assert metrics[1]["error"].startswith("the training loss is ") and "try a lower model.lr (now 1e+12)" in metrics[1]["error"]
    assert 0 < metrics[0]["val_bpd"] < 3 and 0 < metrics[2]["val_bpd"] < 3  # job 2 ran after job 1 failed
    assert f"error: job 1 failed: {metrics[1]['error']}" in result.stderr
    assert "error: 1 jobs failed" in result.stderr.strip().splitlines()[-1]


def test_summary_ranks_jobs_and_lists_the_failed_one(sweep_with_a_failure):
    sweep, _ = sweep_with_a_failure
    metrics = jobs_metrics(sweep)
    summary = (sweep / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    best, second = sorted((0, 2), key=lambda job: metrics[job]["val_bpd"])
    lrs = {0: "0.001", 1: "1000000000000.0", 2: "0.003"}
    assert rows[0].startswith(f"| 1 | {best} | model.lr={lrs[best]} | {metrics[best]['val_bpd']:.4f} |")
    assert rows[1].startswith(f"| 2 | {second} | model.lr={lrs[second]} | {metrics[second]['val_bpd']:.4f} |")
    assert rows[2].startswith("| - | 1 | model.lr=1000000000000.0 | - | - |") and f"failed: {metrics[1]['error']}" in rows[2]
    assert summary.startswith("3 jobs: 2 ok, 1 failed.")
    best_file = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best_file.best_value == metrics[best]["val_bpd"] and best_file.best_params == {"model.lr": float(lrs[best])}
    png = sweep / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(summary.png)" in summary


def test_every_job_shows_in_tensorboard_hparams_with_its_final_metrics(sweep_with_a_failure):
    """What `tensorboard --logdir <sweep dir>` shows in its HPARAMS tab: one session per job with
    the job's hyperparameters, and its final metrics as hparams/* scalars (a failed job: hparams/failed)."""
    sweep, _ = sweep_with_a_failure
    metrics = jobs_metrics(sweep)
    sessions = {}
    for tb_dir in sorted({p.parent for p in sweep.glob("**/events.out.tfevents.*")}):
        events = EventAccumulator(str(tb_dir)).Reload()
        job = int(tb_dir.relative_to(sweep).parts[0].split("_", 1)[0])
        [content] = [c for tag, c in events.PluginTagToContent("hparams").items() if tag == "_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        sessions[job] = (hparams, {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]
                                   if tag.startswith("hparams/")})
    assert sorted(sessions) == [0, 1, 2]
    for job, (hparams, final) in sessions.items():
        assert hparams["model.lr"].number_value == pytest.approx({0: 1e-3, 1: 1e12, 2: 3e-3}[job])
        if job == 1:
            assert final == {"hparams/failed": 1.0}
            continue
        assert final["hparams/val_bpd"] == pytest.approx(metrics[job]["val_bpd"], rel=1e-6)
        assert final["hparams/test_bpd"] == pytest.approx(metrics[job]["test_bpd"], rel=1e-6)


def test_a_single_run_stops_at_a_non_finite_loss(workdir: Path):
    run_dir = workdir / "outputs" / "diverges"
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(workdir), "model.lr=1e12", "trainer.max_epochs=50",
                 f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: the training loss is ") and "at optimizer step" in line and "model.lr" in line
    assert not (run_dir / "metrics.json").exists()  # stopped, not trained on for 50 epochs


def test_non_finite_loss_names_the_first_bad_step():
    one_device = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
    trainer = SimpleNamespace(global_step=12, current_epoch=3, strategy=one_device)  # 12 steps, the last 4 in this batch
    module = SimpleNamespace(hparams={"lr": 0.5})
    stop = StopOnNonFiniteLoss()
    stop.on_train_batch_end(trainer, module, {"loss": torch.tensor([1.0, 0.9, 0.8, 0.7])}, None, 0)
    with pytest.raises(NonFiniteLossError, match=r"is inf at optimizer step 10 \(epoch 4\).*model.lr \(now 0.5\)"):
        stop.on_train_batch_end(trainer, module, {"loss": torch.tensor([1.0, float("inf"), float("nan"), 1.0])},
                                None, 0)
    accumulating = SimpleNamespace(hparams={"lr": 0.5}, accumulate_grad_batches=2)
    with pytest.raises(NonFiniteLossError, match=r"is nan in micro-batch 3 of 4 of the batch ending at optimizer step 12"):
        stop.on_train_batch_end(trainer, accumulating, {"loss": torch.tensor([1.0, 1.0, float("nan"), 1.0])}, None, 0)
    # DDP: another rank's bad loss stops this rank too, in the same batch.
    trainer.strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: True)
    with pytest.raises(NonFiniteLossError, match=r"not finite on another process by optimizer step 12"):
        stop.on_train_batch_end(trainer, module, {"loss": torch.tensor([1.0, 0.9, 0.8, 0.7])}, None, 0)


def test_failure_reasons_are_one_line():
    assert failure_reason(UserError("model.lr=-1 is invalid")) == "model.lr=-1 is invalid"
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    assert failure_reason(oom).startswith("out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "data.batch_size" in failure_reason(oom)
    assert failure_reason(ValueError("bad\nthing")) == "ValueError: bad"


def test_plot_has_a_panel_per_swept_parameter(tmp_path: Path):
    runs = [{"job": job, "params": {"model.lr": lr, "model": arch, "seed": "0"}, "status": status, "val_bpd": bpd}
            for job, (lr, arch, status, bpd) in enumerate([("1e-4", "pixelcnn", "ok", 0.6), ("1e-3", "gated", "ok", 0.5),
                                                           ("1e-2", "gated", "failed", None)])]
    titles = plot(runs, tmp_path / "summary.png")
    assert titles == ["model.lr (1 failed job not shown)", "model (1 failed job not shown)"]  # seed is not swept
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert plot([{**r, "status": "failed"} for r in runs], tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_metrics_json_has_no_nan(tmp_path: Path):
    write_metrics(tmp_path / "metrics.json", {"val_bpd": float("nan"), "test_bpd": float("inf"), "epochs": 2})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"val_bpd": None, "test_bpd": None, "epochs": 2}
    assert "NaN" not in (tmp_path / "metrics.json").read_text()


# --- hyperparameter search ---------------------------------------------------------------------------
def test_optuna_search_ranks_trials_by_their_runs_values(workdir: Path):
    sweep = workdir / "optuna"
    result = run("train.py", "-m", "hparams_search=optuna", *TINY_GATED, *data_args(workdir), "trainer.max_epochs=1",
                 "hydra.sweeper.n_trials=3", "model.channels=choice(4,8)", "model.layers=range(1,3)",
                 f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = collect_runs(sweep)
    assert [r["job"] for r in runs] == [0, 1, 2] and all(r["status"] == "ok" for r in runs)
    values = {r["job"]: r["val_bpd"] for r in runs}
    best = OmegaConf.load(sweep / "optimization_results.yaml")  # written by the Optuna sweeper
    assert best.name == "optuna" and best.best_value == min(values.values())  # the value main returned, a run's own
    best_job = min(values, key=values.get)
    best_run = next(r for r in runs if r["job"] == best_job)
    assert {k: str(v) for k, v in best.best_params.items()} == {k: best_run["params"][k] for k in best.best_params}
    assert set(best.best_params) == {"model.lr", "model.channels", "model.layers", "model.dropout"}
    for job_dir in (sweep / r["dir"] for r in runs):  # named after the searched parameters only
        assert {item.split("=")[0] for item in job_dir.name.split("_", 1)[1].split(",")} == set(best.best_params)
    summary = (sweep / "summary.md").read_text()
    assert f"Best: job {best_job} (" in summary and f"best val {min(values.values()):.4f} bits/dim" in summary
    ranked = [int(line.split("|")[2]) for line in summary.splitlines() if line.startswith("| ") and "rank" not in line]
    assert ranked == sorted(values, key=values.get)
