"""What every command-line entry point shares: a user mistake is one line on stderr and exit
status 2, and leaves no half-written output behind; `device=` means the same everywhere."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from pixelcnn.config import UserError, WriteError, user_errors_unwrapped
from pixelcnn.run_dirs import holds_checkpoints, remove_own_dir, removable_on_error

# A log line that cannot be written (train.log on a full disk) is dropped, not reported with a
# traceback per line: the command's own writes report a full disk, once (`exit_on_user_error`).
logging.raiseExceptions = False


@contextmanager
def exit_on_user_error(cleanup_dir: str | Path | None = None):
    """Turn UserError (data errors included) and unwritable outputs into `error: ...` + exit 2.
    `cleanup_dir` (the run dir) is removed only if this run created it (`removable_on_error`) and
    it holds no checkpoint: one that does can be resumed (e.g. after a full disk is cleared)."""
    try:
        with user_errors_unwrapped():
            yield
    except UserError as err:
        message = str(err)
        if cleanup_dir is not None and Path(cleanup_dir).is_dir():
            if holds_checkpoints(cleanup_dir):
                if isinstance(err, WriteError):
                    message += f"; the run resumes from its last complete checkpoint with ckpt_path={cleanup_dir}"
            elif removable_on_error(cleanup_dir):
                remove_own_dir(cleanup_dir)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


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


def pick_device(name: str) -> torch.device:
    """The `device=` key of sample.py, evaluate.py and train_classifier.py (checked by `validate`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    return torch.device(name)
