"""The `logger` group: TensorBoard (default), CSV and MLflow, alone or several at once; each gets
the metrics, the hyperparameters with the final metrics, and the sample grids. The MLflow run is
read back with MLflow's own client."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from commands import run_here
from test_cli import NO_QUALITY, ROOT, TINY, compose_train, data_args, run, workdir  # noqa: F401 - workdir is a fixture


def test_tensorboard_is_the_default_and_several_loggers_combine():
    assert list(compose_train().logger) == ["tensorboard"]
    cfg = compose_train("logger=[tensorboard,csv,mlflow]")
    assert list(cfg.logger) == ["tensorboard", "csv", "mlflow"]
    assert cfg.logger.mlflow._target_ == "lightning.pytorch.loggers.MLFlowLogger"
    assert "logger" not in compose_train("~logger")  # no logger at all


def test_an_unknown_logger_in_a_list_is_one_error_line(tmp_path: Path):
    result = run_here("train.py", "logger=[tensorboard,wandb]", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: logger=wandb is not an option: choose one of csv, mlflow, tensorboard (files in {ROOT / 'conf/logger'})")


@pytest.fixture(scope="module")
def logged_run(workdir: Path) -> Path:
    run_dir = workdir / "outputs" / "three-loggers"
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(workdir), "logger=[tensorboard,csv,mlflow]",
                 f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_every_logger_gets_metrics_hparams_and_sample_grids(logged_run: Path):
    metrics = json.loads((logged_run / "metrics.json").read_text())
    epochs = [f"epoch{epoch:03d}_T1.png" for epoch in (1, 2)]  # TINY: 2 epochs, a grid each (sample.every_n_epochs=1)
    # TensorBoard, as before: <run>/tb/ with the grids and the final metrics.
    events = EventAccumulator(str(logged_run / "tb"), size_guidance={"images": 0}).Reload()
    assert [image.step for image in events.Images("samples/T=1")] == [1, 2]
    assert events.Scalars("hparams/val_bpd")[-1].value == pytest.approx(metrics["val_bpd"], rel=1e-6)
    # CSV: metrics.csv with the training curves and the final metrics, hparams.yaml, the grids as PNGs.
    rows = list(csv.DictReader((logged_run / "csv" / "metrics.csv").open()))
    assert any(row["train/bpd_step"] for row in rows) and any(row["val/bpd"] for row in rows)
    [final] = [row for row in rows if row["hparams/val_bpd"]]
    assert float(final["hparams/val_bpd"]) == pytest.approx(metrics["val_bpd"], rel=1e-6)
    assert float(final["hparams/test_bpd"]) == pytest.approx(metrics["test_bpd"], rel=1e-6)
    hparams = yaml.safe_load((logged_run / "csv" / "hparams.yaml").read_text())
    assert hparams["optim.lr"] == 1e-4 and hparams["model.filters"] == 8 and hparams["seed"] == 0
    for name in epochs:
        assert Image.open(logged_run / "csv" / "samples" / name).size[0] > 16
    # MLflow, read back with its own client from the store in the run dir.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{logged_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pixelcnn")
    [mlflow_run] = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["run_dir"] == str(logged_run)
    assert mlflow_run.data.metrics["hparams/val_bpd"] == pytest.approx(metrics["val_bpd"], rel=1e-6)
    assert mlflow_run.data.metrics["hparams/test_bpd"] == pytest.approx(metrics["test_bpd"], rel=1e-6)
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "val/bpd")] == [2, 5]  # one per epoch
    assert mlflow_run.data.params["optim.lr"] == "0.0001" and mlflow_run.data.params["model.filters"] == "8"
    assert [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "samples")] == [f"samples/{n}" for n in epochs]
    local = client.download_artifacts(mlflow_run.info.run_id, f"samples/{epochs[-1]}", str(logged_run.parent / "dl"))
    assert Image.open(local).size == Image.open(logged_run / "csv" / "samples" / epochs[-1]).size
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(logged_run)  # nothing outside


def test_a_missing_mlflow_is_one_error_line(workdir: Path):
    """mlflow made unavailable in the child process (its module and its package metadata), as on a
    machine where the extra was not installed."""
    run_dir = workdir / "outputs" / "no-mlflow"
    hide = ("import importlib.metadata as md, runpy, sys\n"
            "version = md.version\n"
            "def without_mlflow(name):\n"
            "    if name == 'mlflow':\n"
            "        raise md.PackageNotFoundError(name)\n"
            "    return version(name)\n"
            "md.version = without_mlflow\n"
            "sys.modules['mlflow'] = None\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", hide, str(ROOT / "train.py"), *TINY, *NO_QUALITY,
                             *data_args(workdir), "logger=[tensorboard,mlflow]", f"hydra.run.dir={run_dir}"],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: logger=mlflow needs the mlflow package, which is not "
                                                     "installed: pip install -e '.[mlflow]' (or pip install mlflow)")
    assert not run_dir.exists()  # nothing half-written


@pytest.mark.parametrize("uri, message", [
    ("sqlite:///{tmp}/garbage.db", "logger.mlflow.tracking_uri: {tmp}/garbage.db is not an SQLite database"),
    ("sqlite:////proc/forbidden/mlflow.db", "logger.mlflow.tracking_uri=/proc/forbidden cannot be written"),
])
def test_an_mlflow_store_that_cannot_be_used_is_one_line_at_once(tmp_path: Path, uri: str, message: str):
    """Checked before MLflow opens it: a file that is not a database was Hydra's many-line error, and an
    unwritable path was retried by MLflow for 2 min 23 s first."""
    from pixelcnn.ops.errors import UserError
    from pixelcnn.ops.reports import build_loggers

    (tmp_path / "garbage.db").write_bytes(b"not a database " * 10)
    cfg = compose_train("logger=mlflow", f"logger.mlflow.tracking_uri={uri.format(tmp=tmp_path)}")
    with pytest.raises(UserError, match=f"^{message.format(tmp=tmp_path)}"):
        build_loggers(cfg)


def test_a_tracking_database_mlflow_cannot_use_is_one_line_and_left_unchanged(tmp_path: Path):
    """Another program's database (e.g. the Optuna study's) was given MLflow's tables; a damaged one, or one of
    a schema this MLflow cannot use (an older version's), was a traceback."""
    from pixelcnn.ops.errors import UserError
    from pixelcnn.ops.reports import build_loggers

    def database(name: str, *statements: str) -> Path:
        with closing(sqlite3.connect(tmp_path / name)) as db:
            for statement in statements:
                db.execute(statement)
            db.commit()
        return tmp_path / name

    foreign = database("study.db", "CREATE TABLE studies (study_id INTEGER)")
    other_schema = database("old.db", "CREATE TABLE experiments (id INTEGER)", "CREATE TABLE alembic_version "
                            "(version_num TEXT)", "INSERT INTO alembic_version VALUES ('0123abcd')")
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    cases = {foreign: f"logger.mlflow.tracking_uri: {foreign} is another program's database (no experiments table): "
                      "pass another file (a new one is created)",
             damaged: f"logger.mlflow.tracking_uri: {damaged} is a damaged SQLite database (",
             other_schema: "logger.mlflow cannot start: CommandError: Can't locate revision identified by '0123abcd'"}
    for path, message in cases.items():
        before = path.read_bytes()
        cfg = compose_train("logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{path}", f"output_dir={tmp_path}")
        with pytest.raises(UserError) as raised:
            build_loggers(cfg)
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
        if path != other_schema:  # MLflow's own check of its schema comes after it opened the file
            assert path.read_bytes() == before
