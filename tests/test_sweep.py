"""Sweeps (`train.py -m`): every job checked before any trains, a failing job recorded while the
others run, a stop at the first non-finite loss, the Optuna search, and what a sweep leaves
behind (summary.md, summary.png, optimization_results.yaml, TensorBoard HPARAMS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from pixelcnn.ops.callbacks import NonFiniteLossError, StopOnNonFiniteLoss
from pixelcnn.ops.errors import failure_reason
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.files import write_json
from pixelcnn.ops.sweep import best_results, collect_runs, plot, seed_groups, summary_table
from commands import run_here
from test_cli import NO_QUALITY, ROOT, TINY, data_args, run, workdir  # noqa: F401 - workdir is a fixture

# TINY for the gated model, which hparams_search=optuna searches (its width and depth are searched).
TINY_GATED = [o for o in TINY if not o.startswith(("model.filters", "model.residual_blocks"))]


def jobs_metrics(sweep: Path) -> dict[int, dict]:
    """Job number -> that job's metrics.json."""
    return {run["job"]: json.loads((sweep / run["dir"] / "metrics.json").read_text()) for run in collect_runs(sweep)}


# --- before anything trains ---------------------------------------------------------------------------
def test_bad_jobs_are_listed_before_any_trains(workdir: Path):
    sweep = workdir / "multirun-bad"
    result = run_here("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), "model.residual_blocks=0,-1,1",
                      "optim.lr=1e-3,-2", f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # Jobs in Hydra's order: (0, 1e-3), (0, -2), (-1, 1e-3), (-1, -2), (1, 1e-3), (1, -2).
    assert lines == [
        "error: job 1 (model.residual_blocks=0 optim.lr=-2): optim.lr=-2 is invalid: it must be a number > 0",
        "error: job 2 (model.residual_blocks=-1 optim.lr=0.001): model.residual_blocks=-1 is invalid: it must be an integer >= 0",
        "error: job 3 (model.residual_blocks=-1 optim.lr=-2): model.residual_blocks=-1 is invalid: it must be an integer >= 0",
        "error: job 5 (model.residual_blocks=1 optim.lr=-2): optim.lr=-2 is invalid: it must be a number > 0",
    ]
    assert not sweep.exists()  # nothing trained, no sweep dir


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=pixelcnn,transformer"], "error: job 1 (model.arch=transformer): model.arch='transformer' is unknown"),
    # Was Hydra's "Could not override 'model.filters'. Key 'filters' is not in struct": now with the closest keys.
    (["model=pixelcnn,gated"], "error: job 1 (model=gated): model.filters is not a key or group of the config "
                               "(model=gated): did you mean model.layers=8"),
])
def test_model_constructor_errors_are_found_before_any_trains(workdir: Path, overrides: list[str], message: str):
    sweep = workdir / "multirun-bad-model"
    result = run_here("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), *overrides, f"hydra.sweep.dir={sweep}",
                      cwd=workdir)
    assert result.returncode == 2 and not sweep.exists()
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(message)


def test_a_conditional_model_on_data_without_classes_is_found_before_any_trains(workdir: Path):
    """model.num_classes=auto (or a count) on unlabelled images: the job's own error, one line, from file names."""
    images = workdir / "unlabelled"
    images.mkdir(exist_ok=True)
    for i in range(30):
        Image.new("L", (16, 16), 8 * i).save(images / f"{i}.png")
    sweep = workdir / "multirun-no-classes"
    result = run_here("train.py", "-m", *TINY, *NO_QUALITY, "data=folder", f"data.path={images}",
                      "model.num_classes=auto,0,3", f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 2 and not sweep.exists(), result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: job 0 (model.num_classes=auto): model.num_classes=auto but the data (folder) has no classes: use "
        "model.num_classes=0 (unconditional), or give the images classes (one sub-folder each, docs/data.md)",
        "error: job 2 (model.num_classes=3): model.num_classes=3 but the data (folder) has no classes: use "
        "model.num_classes=0"]


def test_a_sweep_does_not_resume_a_run(workdir: Path):
    """A resume continues one run in its own dir; several runs from its weights are init_from's."""
    sweep = workdir / "multirun-resume"
    result = run_here("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), f"ckpt_path={workdir}", "seed=0,1",
                      f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 2 and not sweep.exists() and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all("ckpt_path continues one run" in line and "init_from" in line for line in lines)


def test_optuna_search_space_ends_are_checked(workdir: Path):
    sweep = workdir / "optuna-bad"
    result = run_here("train.py", "-m", "hparams_search=optuna", *TINY_GATED, *data_args(workdir),
                      "model.channels=choice(0,8)", "model.dropout=interval(0.0,1.0)", "data.levels=range(200,260,30)",
                      f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert result.returncode == 2 and not sweep.exists()
    assert result.stderr.strip().splitlines() == [
        "error: search space choice(0,8) of model.channels, at model.channels=0: model.channels=0 is invalid: "
        "it must be an integer >= 1",
        "error: search space interval(0.0,1.0) of model.dropout, at model.dropout=1.0: model.dropout=1.0 is invalid: "
        "it must be a number in [0, 1)",
        # The sweeper's range includes its end (Optuna's IntUniformDistribution(200, 260, step=30)): 260 is suggested.
        "error: search space range(200,260,30) of data.levels, at data.levels=260: data.levels=260 is invalid: "
        "it must be an integer in [2, 256]",
    ]


# --- while the jobs run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_with_a_failure(workdir: Path) -> tuple[Path, object]:
    """Three jobs; job 1's learning rate makes the loss non-finite within a few steps."""
    sweep = workdir / "multirun-survives"
    result = run("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), "optim.lr=1e-3,1e12,3e-3",
                 f"hydra.sweep.dir={sweep}", cwd=workdir)
    return sweep, result


def test_a_failing_job_is_recorded_and_the_others_run(sweep_with_a_failure):
    sweep, result = sweep_with_a_failure
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    metrics = jobs_metrics(sweep)
    assert metrics[1]["status"] == "failed"
    assert metrics[1]["error"].startswith("the training loss is ") and "try a lower optim.lr (now 1e+12)" in metrics[1]["error"]
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
    assert rows[0].startswith(f"| 1 | {best} | optim.lr={lrs[best]} | {metrics[best]['val_bpd']:.4f} |")
    assert rows[1].startswith(f"| 2 | {second} | optim.lr={lrs[second]} | {metrics[second]['val_bpd']:.4f} |")
    assert rows[2].startswith("| - | 1 | optim.lr=1000000000000.0 | - | - |") and f"failed: {metrics[1]['error']}" in rows[2]
    assert summary.startswith("3 jobs: 2 ok, 1 failed.")
    best_file = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best_file.best_value == metrics[best]["val_bpd"] and best_file.best_params == {"optim.lr": float(lrs[best])}
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
        assert hparams["optim.lr"].number_value == pytest.approx({0: 1e-3, 1: 1e12, 2: 3e-3}[job])
        if job == 1:
            assert final == {"hparams/failed": 1.0}
            continue
        assert final["hparams/val_bpd"] == pytest.approx(metrics[job]["val_bpd"], rel=1e-6)
        assert final["hparams/test_bpd"] == pytest.approx(metrics[job]["test_bpd"], rel=1e-6)


def test_a_sweep_over_seeds_is_summarized_per_configuration(workdir: Path):
    """A real sweep: two learning rates x two seeds. summary.md ranks the two configurations by
    their mean over seeds (mean ± std, n) above the four jobs; summary.png shows the spread."""
    sweep = workdir / "multirun-seeds"
    result = run("train.py", "-m", *TINY, *NO_QUALITY, *data_args(workdir), "trainer.max_epochs=1",
                 "trainer.limit_train_batches=2", "seed=0,1", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}",
                 cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = collect_runs(sweep)
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs)
    summary = (sweep / "summary.md").read_text()
    rows = table_rows(summary, "| rank | configuration")
    by_lr = {lr: [r for r in runs if r["params"]["optim.lr"] == lr] for lr in ("0.001", "0.002")}
    means = {lr: sum(r["val_bpd"] for r in group) / 2 for lr, group in by_lr.items()}
    assert len({r["val_bpd"] for r in by_lr["0.001"]}) == 2  # the seeds really differ
    for rank, lr in enumerate(sorted(means, key=means.get), 1):
        vals, tests = [r["val_bpd"] for r in by_lr[lr]], [r["test_bpd"] for r in by_lr[lr]]
        std = abs(vals[0] - vals[1]) / 2 ** 0.5  # sample standard deviation of two values
        test_std = abs(tests[0] - tests[1]) / 2 ** 0.5
        assert rows[rank - 1] == [str(rank), f"optim.lr={lr}", "seed=0 seed=1", f"{means[lr]:.4f} ± {std:.4f} (n=2)",
                                  f"{sum(tests) / 2:.4f} ± {test_std:.4f} (n=2)", "0"]
    assert len(table_rows(summary, "| rank | job")) == 4  # the per-job rows stay, below
    assert summary.index("| rank | configuration") < summary.index("| rank | job")
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_params == {"optim.lr": float(min(means, key=means.get))} and best.best_value_n == 2
    assert best.best_value == pytest.approx(min(means.values()))
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert plot(runs, workdir / "again.png") == ["optim.lr"]  # one panel: the seeds are the spread, not a parameter


def test_a_single_run_stops_at_a_non_finite_loss(workdir: Path):
    run_dir = workdir / "outputs" / "diverges"
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(workdir), "optim.lr=1e12", "trainer.max_epochs=50",
                 f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: the training loss is ") and "at optimizer step" in line and "optim.lr" in line
    assert not (run_dir / "metrics.json").exists()  # stopped, not trained on for 50 epochs


def test_the_divergence_error_starts_a_line_after_the_progress_bar(workdir: Path):
    """The progress bar redraws its line with carriage returns and ends it only when done: a run that
    fails midway ends that line, so the error (in a terminal, stdout and stderr together) starts its own."""
    args = [*TINY, *NO_QUALITY, *data_args(workdir), "optim.lr=1e12", "trainer.max_epochs=50",
            "trainer.enable_progress_bar=true", "progress_bar_refresh=1", f"hydra.run.dir={workdir / 'outputs' / 'bar'}"]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=600,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2 and "Epoch 0" in result.stdout, result.stdout[-3000:]
    [error] = [line for line in result.stdout.split("\n") if "error: the training loss is" in line]  # lines as shown
    assert error.startswith("error: the training loss is "), repr(error)


def test_non_finite_loss_names_the_first_bad_step():
    one_device = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
    trainer = SimpleNamespace(global_step=12, current_epoch=3, strategy=one_device)
    module = SimpleNamespace(optim={"lr": 0.5})
    stop = StopOnNonFiniteLoss()
    stop.on_train_batch_end(trainer, module, {"loss": torch.tensor(0.7)}, None, 0)
    with pytest.raises(NonFiniteLossError, match=r"is inf at optimizer step 12 \(batch 5 of epoch 4\).*optim.lr \(now 0.5\)"):
        stop.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("inf"))}, None, 4)
    with pytest.raises(NonFiniteLossError, match=r"is nan at optimizer step 12"):
        stop.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("nan"))}, None, 4)
    # DDP: another rank's bad loss stops this rank too, in the same batch.
    trainer.strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: True)
    with pytest.raises(NonFiniteLossError, match=r"not finite on another process by optimizer step 12"):
        stop.on_train_batch_end(trainer, module, {"loss": torch.tensor(0.7)}, None, 0)


def test_failure_reasons_are_one_line():
    assert failure_reason(UserError("optim.lr=-1 is invalid")) == "optim.lr=-1 is invalid"
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    assert failure_reason(oom).startswith("out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "data.batch_size" in failure_reason(oom)
    assert failure_reason(ValueError("bad\nthing")) == "ValueError: bad"


def test_plot_has_a_panel_per_swept_parameter(tmp_path: Path):
    runs = [{"job": job, "params": {"optim.lr": lr, "model": arch, "seed": "0"}, "status": status, "val_bpd": bpd}
            for job, (lr, arch, status, bpd) in enumerate([("1e-4", "pixelcnn", "ok", 0.6), ("1e-3", "gated", "ok", 0.5),
                                                           ("1e-2", "gated", "failed", None)])]
    titles = plot(runs, tmp_path / "summary.png")
    assert titles == ["optim.lr (1 failed job not shown)", "model (1 failed job not shown)"]  # seed is not swept
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert plot([{**r, "status": "failed"} for r in runs], tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def table_rows(summary: str, header: str) -> list[list[str]]:
    """The cells of the rows of the summary.md table whose header starts with `header`."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def fake_run(job: int, status: str = "ok", val: float | None = None, test: float | None = None, **params: str) -> dict:
    return {"job": job, "dir": str(job), "params": params, "overrides": " ".join(f"{k}={v}" for k, v in params.items()),
            "status": status, "val_bpd": val, "test_bpd": test,
            **({"error": "the training loss is nan"} if status != "ok" else {})}


def test_ranking_is_by_val_when_test_disagrees():
    """Val and test bits/dim in opposite orders: the ranking (and the best) must follow val, the
    number the model was selected on; ranking by test would pick job 1."""
    runs = [fake_run(0, val=0.50, test=0.60, **{"optim.lr": "1e-3"}),
            fake_run(1, val=0.55, test=0.52, **{"optim.lr": "2e-3"}),
            fake_run(2, val=0.53, test=0.56, **{"optim.lr": "3e-3"})]
    summary = summary_table(runs)
    assert [(row[0], row[1]) for row in table_rows(summary, "| rank | job")] == [("1", "0"), ("2", "2"), ("3", "1")]
    assert "Best: job 0 (optim.lr=1e-3)" in summary
    assert best_results(runs, "BasicSweeper")["best_params"] == {"optim.lr": 1e-3}
    # Over seeds: configuration A has the better mean val, B the better mean test.
    seeded = [fake_run(0, val=0.50, test=0.60, seed="0", **{"optim.lr": "1e-3"}),
              fake_run(1, val=0.52, test=0.62, seed="1", **{"optim.lr": "1e-3"}),
              fake_run(2, val=0.55, test=0.50, seed="0", **{"optim.lr": "2e-3"}),
              fake_run(3, val=0.57, test=0.52, seed="1", **{"optim.lr": "2e-3"})]
    summary = summary_table(seeded)
    assert [row[:2] for row in table_rows(summary, "| rank | configuration")] == [["1", "optim.lr=1e-3"],
                                                                                    ["2", "optim.lr=2e-3"]]
    assert best_results(seeded, "BasicSweeper")["best_params"] == {"optim.lr": 1e-3}


def test_seeds_are_aggregated_and_a_failed_seed_is_named():
    runs = [fake_run(0, val=0.50, test=0.51, seed="0", **{"optim.lr": "1e-3"}),
            fake_run(1, val=0.52, test=0.55, seed="1", **{"optim.lr": "1e-3"}),
            fake_run(2, "failed", seed="2", **{"optim.lr": "1e-3"}),
            fake_run(3, val=0.49, test=0.50, seed="0", **{"optim.lr": "2e-3"}),
            fake_run(4, "failed", seed="1", **{"optim.lr": "2e-3"}),
            fake_run(5, "failed", seed="2", **{"optim.lr": "2e-3"}),
            fake_run(6, "failed", seed="0", **{"optim.lr": "3e-3"}),
            fake_run(7, "failed", seed="1", **{"optim.lr": "3e-3"}),
            fake_run(8, "failed", seed="2", **{"optim.lr": "3e-3"})]
    runs[0]["frechet_distance"], runs[1]["frechet_distance"] = 10.0, 14.0
    rows = table_rows(summary_table(runs), "| rank | configuration")
    # lr=2e-3 has one ok seed (0.49): ranked first by its mean, counted n=1, its failed seeds named.
    assert rows[0][:4] == ["1", "optim.lr=2e-3", "seed=0 seed=1 seed=2", "0.4900 (n=1)"]
    assert rows[0][-1] == ("2: job 4 (seed=1): the training loss is nan; job 5 (seed=2): the training loss is nan")
    # lr=1e-3: mean and sample std of the two ok seeds only (the failed one is not averaged in).
    assert rows[1][:6] == ["2", "optim.lr=1e-3", "seed=0 seed=1 seed=2", "0.5100 ± 0.0141 (n=2)",
                           "0.5300 ± 0.0283 (n=2)", "12.0000 ± 2.8284 (n=2)"]
    assert rows[1][-1] == "1: job 2 (seed=2): the training loss is nan"
    assert rows[2][:4] == ["-", "optim.lr=3e-3", "seed=0 seed=1 seed=2", "-"] and rows[2][-1].startswith("3: job 6")
    [group] = [g for g in seed_groups(runs) if g["config"] == "optim.lr=1e-3"]
    assert group["val_bpd"] == (pytest.approx(0.51), pytest.approx(0.0141421, rel=1e-4), 2)
    # Without a repeated seed nothing is aggregated.
    assert seed_groups([fake_run(0, val=0.5, seed="0"), fake_run(1, val=0.6, seed="1", **{"optim.lr": "1"})]) == []


def test_metrics_json_has_no_nan(tmp_path: Path):
    write_json(tmp_path / "metrics.json", {"val_bpd": float("nan"), "test_bpd": float("inf"), "epochs": 2})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"val_bpd": None, "test_bpd": None, "epochs": 2}
    assert "NaN" not in (tmp_path / "metrics.json").read_text()
    write_json(tmp_path / "bench.json", {"train": {"runs": [1.0, float("-inf")]}})  # at any depth (bench.json)
    assert json.loads((tmp_path / "bench.json").read_text()) == {"train": {"runs": [1.0, None]}}


def test_a_sweeps_records_are_read_as_data_and_a_damaged_one_is_named(tmp_path: Path):
    """The summary reads each job's .hydra record and metrics.json as data: an interpolation in them runs no
    resolver (fresh_dir would make a folder, oc.env read the environment), and a damaged file lists its job as
    its row say so instead of ending the summary."""
    from pixelcnn.ops.run_dirs import register_resolvers

    register_resolvers()
    made = tmp_path / "made_by_a_resolver"
    records = {"0": (f"hydra:\n  job:\n    num: ${{fresh_dir:{made}}}\n", "- seed=${oc.env:HOME}\n", '{"val_bpd": 0.5}'),
               "1": ("hydra:\n  job:\n    num: 1\n", "- seed=1\n", "[0.4]"),
               "2": ("hydra:\n  job:\n    num: 2\n", "seed: 2\n", '{"val_bpd": 0.3}'),
               "3": ("hydra: [\n", "- seed=3\n", "{not json")}
    for name, (hydra_yaml, overrides, metrics) in records.items():
        (tmp_path / "sweep" / name / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / name / ".hydra" / "hydra.yaml").write_text(hydra_yaml)
        (tmp_path / "sweep" / name / ".hydra" / "overrides.yaml").write_text(overrides)
        (tmp_path / "sweep" / name / "metrics.json").write_text(metrics)
    runs = {run["dir"]: run for run in collect_runs(tmp_path / "sweep")}
    assert not made.exists()
    assert (runs["0"]["job"], runs["0"]["status"], runs["0"]["params"]) == (None, "ok", {"seed": "${oc.env:HOME}"})
    assert (runs["1"]["status"], runs["1"]["error"]) == ("failed", "its metrics.json is damaged (not a JSON mapping)")
    assert (runs["2"]["job"], runs["2"]["status"], runs["2"]["overrides"]) == (2, "ok", "(damaged .hydra/overrides.yaml)")
    assert (runs["3"]["job"], runs["3"]["status"]) == (None, "failed")
    assert summary_table(list(runs.values())).startswith("4 jobs: 2 ok, 2 failed.")


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
    assert set(best.best_params) == {"optim.lr", "model.channels", "model.layers", "model.dropout"}
    for job_dir in (sweep / r["dir"] for r in runs):  # named after the searched parameters only
        assert {item.split("=")[0] for item in job_dir.name.split("_", 1)[1].split(",")} == set(best.best_params)
    summary = (sweep / "summary.md").read_text()
    assert f"Best: job {best_job} (" in summary and f"best val {min(values.values()):.4f} bits/dim" in summary
    ranked = [int(line.split("|")[2]) for line in summary.splitlines() if line.startswith("| ") and "rank" not in line]
    assert ranked == sorted(values, key=values.get)


def test_running_the_same_optuna_search_again_continues_its_study(workdir: Path):
    """Two invocations of one command, 2 trials each: the second adds trials 2 and 3 to the study kept in
    multirun/optuna/<study_name>.db, with new suggestions, and its summary lists all four trials with
    their sweep. data.val_size=1000 (of 100 images) fails as the job starts: that trial stays failed."""
    tiny = [o for o in TINY_GATED if not o.startswith("data.val_size")]  # searched here
    command = ["train.py", "-m", "hparams_search=optuna", *tiny, *data_args(workdir), "trainer.max_epochs=1",
               "trainer.limit_train_batches=2", "sample.every_n_epochs=0", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.study_name=continued",
               "model.channels=choice(4,8)", "model.layers=range(1,3)", "data.val_size=choice(20,1000)"]
    sweeps = [workdir / "optuna-first", workdir / "optuna-again"]
    for sweep in sweeps:
        result = run(*command, f"hydra.sweep.dir={sweep}", cwd=workdir)
        failed = [r for r in collect_runs(sweep) if r["params"]["data.val_size"] == "1000"]
        assert result.returncode == (1 if failed else 0), result.stderr[-3000:]
    assert "continuing the Optuna study 'continued' (2 trials so far)" in result.stdout
    import optuna

    study = optuna.load_study(study_name="continued", storage=f"sqlite:///{workdir / 'multirun/optuna/continued.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    first, again = (collect_runs(sweep) for sweep in sweeps)
    jobs = [(job, sweep) for sweep, runs in ((1, first), (2, again)) for job in runs]  # trial order
    assert len(jobs) == 4
    assert jobs[2][0]["params"] != jobs[0][0]["params"]  # the continued sampler does not repeat the first sweep
    for trial, (job, _) in zip(study.trials, jobs):
        assert {k: str(v) for k, v in trial.params.items()} == {k: job["params"][k] for k in trial.params}
        if job["params"]["data.val_size"] == "1000":  # failed, not a NaN value
            assert job["status"] == "failed" and trial.state.name == "FAIL" and trial.value is None
        else:
            assert job["status"] == "ok" and trial.state.name == "COMPLETE" and trial.value == job["val_bpd"]
    assert {job["status"] for job, _ in jobs} == {"ok", "failed"}  # both cases happened
    # The first summary had its two trials; the second lists all four, ranked, each with its sweep and job.
    assert len(table_rows((sweeps[0] / "summary.md").read_text(), "| rank | trial")) == 2
    summary = (sweeps[1] / "summary.md").read_text()
    rows = table_rows(summary, "| rank | trial")
    ok = sorted((n for n, (job, _) in enumerate(jobs) if job["status"] == "ok"), key=lambda n: jobs[n][0]["val_bpd"])
    failed = [n for n, (job, _) in enumerate(jobs) if job["status"] != "ok"]
    assert [row[1] for row in rows] == [str(n) for n in ok + failed]
    for row in rows:
        job, sweep = jobs[int(row[1])]
        assert row[2:4] == [str(sweep), str(job["job"])]
        assert row[-1] == ("ok" if job["status"] == "ok" else f"failed: {job['error']}")
    assert f"1 = {sweeps[0]}; 2 = {sweeps[1]} (this one)" in summary
    best = OmegaConf.load(sweeps[1] / "optimization_results.yaml")  # the sweeper's best of the whole study
    assert best.best_value == jobs[ok[0]][0]["val_bpd"]


def test_a_study_database_optuna_cannot_use_is_one_line(tmp_path: Path):
    """Another program's database was given Optuna's tables; a damaged one, or one of another Optuna's schema,
    was a traceback."""
    import sqlite3

    import optuna

    from pixelcnn.ops.sweep import OPTUNA_SWEEPER, open_study

    def sweeper(path: Path):
        return OmegaConf.create({"hydra": {"sweeper": {"_target_": OPTUNA_SWEEPER, "storage": f"sqlite:///{path}",
                                                       "study_name": "pixelcnn", "direction": "minimize"}}})

    foreign, damaged, other_schema = tmp_path / "mlflow.db", tmp_path / "damaged.db", tmp_path / "old.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE experiments (experiment_id INTEGER)")
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    optuna.create_study(storage=f"sqlite:///{other_schema}", study_name="pixelcnn")
    with sqlite3.connect(other_schema) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v0.9.0.a'")
    before = foreign.read_bytes()
    for path, message in {foreign: f"hydra.sweeper.storage: {foreign} is another program's database (no studies "
                                   "table): pass another file (a new one is created)",
                          damaged: f"hydra.sweeper.storage: {damaged} is a damaged SQLite database (",
                          other_schema: f"hydra.sweeper.storage=sqlite:///{other_schema} cannot hold the study: "
                                        "RuntimeError: The runtime optuna version"}.items():
        with pytest.raises(UserError) as raised:
            open_study(sweeper(path))
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert foreign.read_bytes() == before


def test_a_study_db_that_is_not_one_is_one_line_and_leaves_no_sweep_dir(tmp_path: Path):
    """Was two tracebacks (the summary's callback, then the sweeper) and an empty sweep dir."""
    (tmp_path / "multirun" / "optuna").mkdir(parents=True)
    (tmp_path / "multirun" / "optuna" / "pixelcnn.db").write_bytes(b"not a database " * 10)
    result = run_here("train.py", "-m", "hparams_search=optuna", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == ["error: hydra.sweeper.storage: multirun/optuna/pixelcnn.db is not an "
                                                  "SQLite database: pass another file (a new one is created)"]
    assert [p.name for p in (tmp_path / "multirun").iterdir()] == ["optuna"]  # no sweep dir
