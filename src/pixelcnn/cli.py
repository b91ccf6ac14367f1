"""Shared behaviour of the command-line entry points: a user mistake is one line on stderr and
exit status 2, and leaves no half-written output behind; in a sweep, a failing job is recorded
and the sweep goes on."""

from __future__ import annotations

import logging
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from pixelcnn.config import UserError
from pixelcnn.data import CorruptDatasetError, DatasetNotFoundError
from pixelcnn.sweep import write_metrics

log = logging.getLogger(__name__)


def holds_only_hydra_files(run_dir: Path) -> bool:
    """True if `run_dir` has nothing but what Hydra writes as a job starts (.hydra/, <job>.log),
    so removing it cannot delete anything else, e.g. with hydra.run.dir=. (the launch dir)."""
    return run_dir.is_dir() and all(p.name == ".hydra" or (p.is_file() and p.suffix == ".log")
                                    for p in run_dir.iterdir())


@contextmanager
def user_errors_unwrapped():
    """Re-raise what wraps a user's mistake as the UserError it is."""
    try:
        yield
    except InstantiationException as err:  # hydra's `instantiate` wraps what a constructor raised
        raise err.__cause__ if isinstance(err.__cause__, UserError) else err
    except MissingMandatoryValue as err:  # a `???` key of the config, e.g. ckpt
        raise UserError(f"{err.full_key} is required: pass {err.full_key}=<value> (e.g. ckpt=outputs/<date>/<time>)") from None


USER_ERRORS = (UserError, DatasetNotFoundError, CorruptDatasetError)


@contextmanager
def exit_on_user_error(cleanup_dir: str | Path | None = None):
    """Turn UserError and data errors into `error: ...` + exit 2. `cleanup_dir` (a fresh run
    dir) is removed if the failure came before anything but Hydra's own files was written."""
    try:
        with user_errors_unwrapped():
            yield
    except USER_ERRORS as err:
        if cleanup_dir is not None and holds_only_hydra_files(Path(cleanup_dir)):
            shutil.rmtree(cleanup_dir, ignore_errors=True)
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
