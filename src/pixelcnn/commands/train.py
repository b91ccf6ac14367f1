"""What `train.py` does around `training.train(cfg)`: the argv a resumed run is started with,
the run dir checks before Hydra writes, and a sweep that survives its failing jobs: each job's
config is checked before any trains, a failing job is recorded and the others go on, and a
summary is written at the end. The three Hydra callbacks are named in conf/train.yaml."""

from __future__ import annotations

import atexit
import json
import logging
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from pixelcnn.checkpoints import check_resume, read_checkpoint, resolve_checkpoint
from pixelcnn.commands.cli import exit_on_unknown_choice, exit_on_user_error
from pixelcnn.config import UserError, user_errors_unwrapped
from pixelcnn.run_dirs import check_run_dir, fresh_dir, register_resolvers, run_dir_of
from pixelcnn.sweep import write_metrics, write_summary
from pixelcnn.sweep_check import sweep_errors

log = logging.getLogger(__name__)
register_resolvers()  # conf/train.yaml's run dir names; here, so that every process running a job has them


def main(cfg: DictConfig) -> float | None:
    """Train and test; returns the run's best val bits/dim, the value a sweeper (hparams_search=optuna)
    minimizes, or None for a sweep job that failed."""
    from pixelcnn.training import train  # imported late so that `--help` and config errors are fast

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a failing job is recorded; the other jobs still run
        with record_job_failure(cfg.output_dir, HydraConfig.get().job.num):
            return train(cfg)["val_bpd"]
        # Not NaN: with optuna 2.10 the Optuna sweeper crashes on a NaN value; a non-float marks the trial failed.
        return None
    # Removed after an input error only if this run created it (a resumed run's dir never is).
    with exit_on_user_error(cleanup_dir=cfg.output_dir):
        return train(cfg)["val_bpd"]


def prepare_argv(argv: list[str], config_dir: Path) -> list[str]:
    """Before Hydra: refuse unknown config choices in one line; add a resumed run's overrides."""
    exit_on_unknown_choice(argv, config_dir)
    return with_resume_overrides(argv)


def with_resume_overrides(argv: list[str]) -> list[str]:
    """`train.py ckpt_path=<run> [more]` -> argv with the run's own overrides (its
    `.hydra/overrides.yaml`) put before the user's, so a resumed run has the config it was
    started with (experiment=..., model=..., data.root=...) without retyping it."""
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]  # not flags, nor their values
    resume = [a.split("=", 1)[1] for a in overrides if a.startswith("ckpt_path=")]
    if not resume or not resume[-1] or "-m" in argv or "--multirun" in argv:
        return argv
    run_dir = run_dir_of(resume[-1])
    saved = Path(run_dir) / ".hydra" / "overrides.yaml" if run_dir else None
    if saved is None or not saved.is_file():
        return argv
    # Not the ones already given: Lightning's DDP processes re-run this (already rewritten) command.
    original = [o for o in OmegaConf.load(saved) if not str(o).startswith(("ckpt_path=", "hydra.")) and o not in argv]
    if not original:
        return argv
    print(f"[pixelcnn] resuming: re-applying the run's overrides from {saved}: {' '.join(original)}", flush=True)
    first = argv.index(overrides[0])
    return argv[:first] + [str(o) for o in original] + argv[first:]


def failure_reason(err: BaseException) -> str:
    """One line saying why a job failed: a user error's own message, else the exception's type
    and message (its first line), with out-of-memory errors named as such."""
    message = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, UserError):
        return message
    if type(err).__name__ == "OutOfMemoryError" or "out of memory" in message.lower():  # CUDA, MPS or host
        return f"out of memory ({type(err).__name__}: {message}): try a smaller data.batch_size or model"
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


@contextmanager
def record_job_failure(job_dir: str | Path, job: int | str):
    """In a sweep, a job that fails must not end the sweep (Hydra's BasicSweeper re-raises a job's
    exception, and `sys.exit` would end the process): the failure is written to the job's
    metrics.json as {"status": "failed", "error": <one line>} and one `error:` line is printed.
    SweepSummary lists it and makes the sweep exit non-zero at the end. Anything but a user
    error or running out of memory also logs its traceback, for debugging."""
    try:
        with user_errors_unwrapped():
            yield
    except Exception as err:  # noqa: BLE001 - every failure of one job is recorded, the sweep goes on
        from pixelcnn.training import secondary_rank  # loaded already: the job was training

        if secondary_rank():  # a DDP job's other processes: rank 0 records the failure
            return
        reason = failure_reason(err)
        if not isinstance(err, UserError) and not reason.startswith("out of memory"):  # likely a bug
            log.error("job %s failed", job, exc_info=err)  # Hydra's job logging: stdout and the job's .log
        with suppress(OSError):  # e.g. the disk that failed the job is full: the error line still tells
            write_metrics(Path(job_dir) / "metrics.json", {"status": "failed", "error": reason})
        print(f"error: job {job} failed: {reason}", file=sys.stderr, flush=True)


def finished_run(run_dir: Path, max_epochs: int, max_time: str | None = None) -> str | None:
    """Why the run in `run_dir` is over, or None if resuming it would train more: it wrote its
    metrics.json (it ended) and reached `max_epochs` or `max_time` ("DD:HH:MM:SS"), or was stopped
    early (a resume restores the stopping state and the time spent, so it would stop at once)."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    try:
        epochs = json.loads(metrics_file.read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(epochs, int) and max_epochs != -1 and epochs >= max_epochs:
        return f"it trained {epochs} epochs, trainer.max_epochs={max_epochs}: pass trainer.max_epochs=<more> to extend it"
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        callbacks = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    except Exception:  # noqa: BLE001 - no readable last.ckpt: the resume itself reports that
        return None
    if any(key.startswith("EarlyStopping") and state.get("stopped_epoch", 0) > 0 for key, state in callbacks.items()):
        return f"early stopping ended it after {epochs} epochs"
    if max_time:
        days, hours, minutes, seconds = (int(part) for part in max_time.split(":"))
        limit = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        if callbacks.get("Timer", {}).get("time_elapsed", {}).get("train", 0) >= limit:
            return f"it trained for trainer.max_time={max_time}: pass a larger trainer.max_time to extend it"
    return None


class RunDirGuard(Callback):
    """Checks the run dir (or a sweep's dir) before Hydra writes into it (`run_dirs.check_run_dir`).
    Hydra's callbacks turn an exception into a warning, so a refusal exits here directly. Runs
    that keep no record (`hydra.output_subdir: null`) are not checked: bench.py, and the DDP ranks
    > 0 that Lightning starts by re-running the command with it, into the dir rank 0 checked."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None:
            return
        run_dir = Path(str(config.hydra.run.dir))
        ckpt_path = config.get("ckpt_path")
        resume_dir = run_dir_of(str(ckpt_path)) if ckpt_path else None
        resuming = resume_dir is not None and run_dir.resolve() == Path(resume_dir).resolve()
        if not resuming and str(OmegaConf.to_container(config.hydra.run)["dir"]).startswith("${resume_run_dir:"):
            # The default name (outputs/<date>/<time>): reserve it, or a suffixed one if another run has it.
            run_dir = Path(fresh_dir(str(run_dir)))
            with read_write(config.hydra.run):
                config.hydra.run.dir = str(run_dir)
        with exit_on_user_error(cleanup_dir=run_dir):
            check_run_dir(run_dir, "hydra.run.dir", resuming)
            if ckpt_path:  # a checkpoint that cannot be resumed is refused before Hydra writes its record
                path = resolve_checkpoint(str(ckpt_path), prefer="last", key="ckpt_path")
                check_resume(read_checkpoint(path, key="ckpt_path"), config.model, path)
        trainer = config.get("trainer") or {}
        if resuming and (reason := finished_run(run_dir, trainer.get("max_epochs", -1), trainer.get("max_time"))):
            print(f"[pixelcnn] {run_dir} has already finished ({reason}); nothing was changed", flush=True)
            sys.exit(0)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_on_user_error():
            check_run_dir(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir", resuming=False)



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
    trial failed: "No trials are completed yet"), the summary of the jobs so far is written at exit."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.register(self.write_at_exit, config)  # Hydra calls no callback when the sweep raises

    @staticmethod
    def write_at_exit(config: DictConfig) -> None:
        if Path(config.hydra.sweep.dir).is_dir():
            write_summary(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.write_at_exit)
        if failed := write_summary(config):
            print(f"error: {failed} jobs failed (see {Path(config.hydra.sweep.dir) / 'summary.md'})",
                  file=sys.stderr, flush=True)
            # SystemExit passes through Hydra's callback and error handling (they catch Exception).
            raise SystemExit(1)
