"""Shared behaviour of the command-line entry points: a user mistake is one line on stderr and
exit status 2, and leaves no half-written output behind; in a sweep, a failing job is recorded
and the sweep goes on."""

from __future__ import annotations

import errno
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import MissingMandatoryValue

from pixelcnn.checkpoints import check_resume, finished_run, read_checkpoint, resolve_checkpoint
from pixelcnn.config import UserError
from pixelcnn.data import CorruptDatasetError, DatasetNotFoundError
from pixelcnn.run_dirs import check_run_dir, fresh_dir, remove_own_dir, removable_on_error, resume_dir_of
from pixelcnn.sweep import write_metrics

log = logging.getLogger(__name__)

# Writing failed for a reason the user can fix (where the output goes), not a bug: one line.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC, errno.EDQUOT}


@contextmanager
def user_errors_unwrapped():
    """Re-raise what wraps a user's mistake as the UserError it is."""
    try:
        yield
    except InstantiationException as err:  # hydra's `instantiate` wraps what a constructor raised
        raise err.__cause__ if isinstance(err.__cause__, UserError) else err
    except MissingMandatoryValue as err:  # a `???` key of the config, e.g. ckpt
        raise UserError(f"{err.full_key} is required: pass {err.full_key}=<value> (e.g. ckpt=outputs/<date>/<time>)") from None
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        where = err.filename or "the output folder"
        raise UserError(f"cannot write {where}: {err.strerror}; pass a writable folder for the outputs") from None


USER_ERRORS = (UserError, DatasetNotFoundError, CorruptDatasetError)


@contextmanager
def exit_on_user_error(cleanup_dir: str | Path | None = None):
    """Turn UserError, data errors and unwritable outputs into `error: ...` + exit 2.
    `cleanup_dir` (the run dir) is removed only if this run created it (`removable_on_error`)."""
    try:
        with user_errors_unwrapped():
            yield
    except USER_ERRORS as err:
        if cleanup_dir is not None and Path(cleanup_dir).is_dir() and removable_on_error(cleanup_dir):
            remove_own_dir(cleanup_dir)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def failure_reason(err: BaseException) -> str:
    """One line saying why a job failed: a user error's own message, else the exception's type
    and message (its first line), with out-of-memory errors named as such."""
    message = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, USER_ERRORS):
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
        if not isinstance(err, USER_ERRORS) and not reason.startswith("out of memory"):  # likely a bug
            log.error("job %s failed", job, exc_info=err)  # Hydra's job logging: stdout and the job's .log
        write_metrics(Path(job_dir) / "metrics.json", {"status": "failed", "error": reason})
        print(f"error: job {job} failed: {reason}", file=sys.stderr, flush=True)


class RunDirGuard(Callback):
    """A Hydra callback: checks the run dir (or a sweep's dir) before Hydra writes into it, see
    `pixelcnn.run_dirs.check_run_dir`. Commands that keep no record (`hydra.output_subdir: null`,
    e.g. bench.py writing into the launch dir) have no run dir to check.

    Hydra's callbacks turn an exception into a warning, so a refusal exits here directly."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None:
            return
        run_dir = Path(str(config.hydra.run.dir))
        ckpt_path = config.get("ckpt_path")
        resume_dir = resume_dir_of(str(ckpt_path)) if ckpt_path else None
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
        if config.hydra.output_subdir is None:
            return
        with exit_on_user_error():
            check_run_dir(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir", resuming=False)


def exit_on_unknown_choice(argv: list[str], config_dir: str | Path) -> None:
    """`group=option` overrides (model=gated, experiment=quick, sweeps like model=pixelcnn,gated)
    naming an option that `config_dir/group/` does not have: one `error:` line with the choices,
    exit 2. Run before Hydra, whose own message is a dozen lines of search-path details."""
    config_dir = Path(config_dir)
    for arg in argv[1:]:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = config_dir / key
        if not sep or key.startswith("hydra") or not group.is_dir() or any(c in value for c in "()[]{}$"):
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        for option in (v.strip() for v in value.split(",")):
            if option and option != "null" and option not in choices:
                print(f"error: {key}={option} is not an option: choose one of {', '.join(choices)} "
                      f"(files in {group})", file=sys.stderr, flush=True)
                sys.exit(2)
