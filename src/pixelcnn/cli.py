"""Shared behaviour of the command-line entry points: a user mistake is one line on stderr and
exit status 2, and leaves no half-written output behind."""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from pixelcnn.config import UserError
from pixelcnn.data import CorruptDatasetError, DatasetNotFoundError


def holds_only_hydra_files(run_dir: Path) -> bool:
    """True if `run_dir` has nothing but what Hydra writes as a job starts (.hydra/, <job>.log),
    so removing it cannot delete anything else, e.g. with hydra.run.dir=. (the launch dir)."""
    return run_dir.is_dir() and all(p.name == ".hydra" or (p.is_file() and p.suffix == ".log")
                                    for p in run_dir.iterdir())


@contextmanager
def exit_on_user_error(cleanup_dir: str | Path | None = None):
    """Turn UserError and data errors into `error: ...` + exit 2. `cleanup_dir` (a fresh run
    dir) is removed if the failure came before anything but Hydra's own files was written."""
    try:
        try:
            yield
        except InstantiationException as err:  # hydra's `instantiate` wraps what a constructor raised
            raise err.__cause__ if isinstance(err.__cause__, UserError) else err
        except MissingMandatoryValue as err:  # a `???` key of the config, e.g. ckpt
            raise UserError(f"{err.full_key} is required: pass {err.full_key}=<value> (e.g. ckpt=outputs/<date>/<time>)") from None
    except (UserError, DatasetNotFoundError, CorruptDatasetError) as err:
        if cleanup_dir is not None and holds_only_hydra_files(Path(cleanup_dir)):
            shutil.rmtree(cleanup_dir, ignore_errors=True)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
