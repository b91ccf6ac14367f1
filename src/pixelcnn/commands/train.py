"""What `train.py` does around `training.train(cfg)`: the run dir checks and a resumed run's
config and checkpoint, before Hydra writes, and a sweep that survives its failing jobs: each job's
config is checked before any trains, a failing job is recorded and the others go on, and a
summary is written at the end. The three Hydra callbacks are named in conf/train.yaml."""

from __future__ import annotations

import atexit
import logging
import sys
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from pixelcnn.commands.cli import exit_on_user_error, fail
from pixelcnn.ops.errors import UserError, error_line, user_errors_unwrapped
from pixelcnn.ops.final_config import complete
from pixelcnn.ops.resources import secondary_rank
from pixelcnn.ops.run_dirs import RunDirInUse, check_run_dir, claim_if_new, hold_run_dir, register_resolvers
from pixelcnn.ops.files import write_json
from pixelcnn.ops.sweep import start_study_sweep, write_summary
from pixelcnn.ops.sweep_check import sweep_errors

register_resolvers()  # conf/train.yaml's run dir names; here, so that every process running a job has them


def main(cfg: DictConfig) -> float | None:
    """Train and test; returns the run's best val bits/dim, the value a sweeper (hparams_search=optuna)
    minimizes, or None for a sweep job that failed."""
    from pixelcnn.training import train  # imported late so that `--help` and config errors are fast
    # That import runs lightning/__init__, which gives the `lightning` logger a terminal handler of its own;
    # Hydra's job logging (conf/train.yaml) ran before it, so each Lightning line would print twice.
    logging.getLogger("lightning").handlers.clear()

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a failing job is recorded; the other jobs still run
        with record_job_failure(cfg.output_dir, HydraConfig.get().job.num), sweep_job_dir(cfg):
            complete(cfg)  # a requeued job's checkpoint
            return train(cfg)["val_bpd"]
        # Not NaN: with optuna 2.10 the Optuna sweeper crashes on a NaN value; a non-float marks the trial failed.
        return None
    # Removed after an input error only if this run created it; of a resumed run, only its record
    # .hydra/resume-<time>/ (a refused resume leaves none, so the next one reads the run's last good one).
    record = str(HydraConfig.get().output_subdir)
    with exit_on_user_error(cleanup_dir=Path(cfg.output_dir) / record if "/resume-" in record else cfg.output_dir):
        return train(cfg)["val_bpd"]


@contextmanager
def sweep_job_dir(cfg: DictConfig):
    """A sweep job holds its dir's lock while it runs (`run_dirs.hold_run_dir`: a resume of that dir is
    refused meanwhile, and a second process on the same job dir too), whatever the launcher; Hydra's
    on_job_start cannot refuse a job (it turns a callback's exception into a warning)."""
    job_dir = Path(cfg.output_dir)
    # Released as the job ends (closing the lock's file releases the flock): the process (a serial sweep's, a joblib
    # worker) goes on to other jobs.
    with nullcontext() if secondary_rank() else open(hold_run_dir(job_dir, f"the job dir {job_dir}"), "rb"):
        yield


@contextmanager
def record_job_failure(job_dir: str | Path, job: int | str):
    """In a sweep, a job that fails must not end the sweep (Hydra's BasicSweeper re-raises a job's
    exception, and `sys.exit` would end the process): the failure is written to the job's
    metrics.json as {"status": "failed", "error": <one line>} and one `error:` line is printed.
    SweepSummary lists it and makes the sweep exit non-zero at the end. Anything but a user
    error or running out of memory names the file that holds its traceback (`cli.error_line`)."""
    try:
        with user_errors_unwrapped():
            yield
    except Exception as err:  # noqa: BLE001 - every failure of one job is recorded, the sweep goes on
        if secondary_rank():  # a DDP job's other processes: rank 0 records the failure
            return
        reason = error_line(err)
        # Not in a dir another process holds (it is that run's); the summary lists a job without one as failed.
        with suppress(OSError):  # e.g. the disk that failed the job is full: the error line still tells
            if not isinstance(err, RunDirInUse):
                write_json(Path(job_dir) / "metrics.json", {"status": "failed", "error": reason})
        print(f"error: job {job} failed: {reason}", file=sys.stderr, flush=True)


class RunDirGuard(Callback):
    """Before Hydra writes into the run dir: completes the config (`final_config.complete`: a resume's, a
    requeued SLURM job's; or exit 0 if the run has finished), checks the run dir (`run_dirs.check_run_dir`)
    and locks it (`run_dirs.hold_run_dir`: a second run in it is refused); for a sweep, its dir and its jobs'
    overrides. Hydra turns a callback's exception into a warning, so a refusal exits here. DDP ranks > 0 get
    the same config, unchecked; bench.py (no record) is not checked."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.job.config_name == "bench":  # bench.py writes no run dir (a train.py run without .hydra does)
            return
        with exit_on_user_error():  # nothing created yet: complete reserves a new run dir last
            run_dir, resuming = complete(config)
            if (subdir := config.hydra.output_subdir) is not None and (  # a resume's must not replace the run's
                    not subdir.startswith(".hydra/resume-") if resuming else subdir != ".hydra"):
                raise UserError(f"hydra.output_subdir={subdir} is not a setting here: a run keeps its record in "
                                ".hydra/ (a resume's in .hydra/resume-<time>/), where resumes read it; null: no record")
        if secondary_rank():  # DDP ranks started by Lightning, srun or torchrun: rank 0 checks and holds the dir
            return
        with exit_on_user_error(cleanup_dir=run_dir):
            check_run_dir(run_dir, "hydra.run.dir", resuming)
            if resuming and config.hydra.output_subdir:  # .hydra/resume-<time>/: this run's own record (none: null)
                claim_if_new(run_dir / config.hydra.output_subdir)
        with exit_on_user_error():  # no cleanup: the dir is the other run's
            hold_run_dir(run_dir, f"{'ckpt_path' if resuming else 'hydra.run.dir'}={run_dir}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_on_user_error():
            if (subdir := config.hydra.output_subdir) != ".hydra" and config.hydra.job.config_name == "train":
                raise UserError(f"hydra.output_subdir={'null' if subdir is None else subdir} leaves a sweep's jobs "
                                "without the .hydra record its summary reads (each job's overrides): drop it for a "
                                "sweep")
            check_run_dir(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir", resuming=False)
        complete(config)


class SweepPrecheck(Callback):
    """Checks every job of a sweep before any trains (`sweep_check.sweep_errors`): bad jobs get
    one `error:` line each and the sweep stops with exit status 2, before its dir is created."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if errors := sweep_errors(config):
            print("\n".join(errors), file=sys.stderr, flush=True)
            # SystemExit passes through Hydra's callback and error handling (they catch Exception).
            raise SystemExit(2)


class SweepSummary(Callback):
    """When a sweep ends: its summary (`sweep.write_summary`), then exit status 1 if any job
    failed. If the sweep ends early instead (Ctrl-C, or the Optuna sweeper's error when every
    trial failed: "No trials are completed yet"), the summary of the jobs so far is written at exit.
    An Optuna sweep with a storage is recorded in its study first (`sweep.start_study_sweep`), so
    that the summary lists every trial of the study, continued or not."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_on_user_error(cleanup_dir=config.hydra.sweep.dir):  # e.g. a study DB that is not one
            start_study_sweep(config)
        atexit.register(write_summary, config)  # Hydra calls no callback when the sweep raises

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(write_summary)
        if failed := write_summary(config):
            # SystemExit passes through Hydra's callback and error handling (they catch Exception).
            fail(f"{failed} jobs failed (see {Path(config.hydra.sweep.dir) / 'summary.md'})", 1)
