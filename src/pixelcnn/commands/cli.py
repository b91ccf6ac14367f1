"""What every command-line entry point shares: a user mistake is one line on stderr and exit
status 2, and leaves no half-written output behind; `device=` and `ckpt=` mean the same everywhere."""

from __future__ import annotations

import difflib
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pixelcnn.checkpoints import load_module, resolve_checkpoint
from pixelcnn.config import UserError, WriteError, as_override, check_out_dir, user_errors_unwrapped
from pixelcnn.image_model import ImageModel
from pixelcnn.run_dirs import holds_checkpoints, removable_on_error, remove_own_dir, run_dir_of

# A log line that cannot be written (train.log on a full disk) is dropped, not reported with a
# traceback per line: the command's own writes report a full disk, once (`exit_on_user_error`).
logging.raiseExceptions = False


@contextmanager
def exit_on_user_error(cleanup_dir: str | Path | None = None):
    """Turn UserError (data errors included) and unwritable outputs into `error: ...` + exit 2, and
    any other exception into one line too (`error_line`: it names the file holding its traceback), exit 1.
    `cleanup_dir` (the run dir) is removed only if this run created it (`removable_on_error`) and
    it holds no checkpoint: one that does can be resumed (e.g. after a full disk is cleared)."""
    try:
        with user_errors_unwrapped():
            yield
    except Exception as err:  # noqa: BLE001 - every failure is one line
        message = str(err) if isinstance(err, UserError) else error_line(err)
        if cleanup_dir is not None and Path(cleanup_dir).is_dir():
            if holds_checkpoints(cleanup_dir):
                if isinstance(err, WriteError):
                    message += f"; the run resumes from its last complete checkpoint with ckpt_path={cleanup_dir}"
            elif removable_on_error(cleanup_dir):
                remove_own_dir(cleanup_dir)
        fail(message, 2 if isinstance(err, UserError) else 1)


def failure_reason(err: BaseException) -> str:
    """One line saying why a command (or a sweep's job) failed: a user error's own message, else the
    exception's type and message (its first line), with out-of-memory errors named as such."""
    message = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, UserError):
        return message
    if type(err).__name__ == "OutOfMemoryError" or "out of memory" in message.lower():  # CUDA, MPS or host
        return f"out of memory ({type(err).__name__}: {message}): try a smaller data.batch_size or model"
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def error_line(err: BaseException) -> str:
    """`failure_reason`, and for a failure no check foresaw (a bug, likely) the file that holds its traceback:
    in the system's temp dir, as the run dir of a run that saved nothing is removed."""
    reason = failure_reason(err)
    if isinstance(err, UserError) or reason.startswith("out of memory"):
        return reason
    try:
        with tempfile.NamedTemporaryFile("w", prefix="pixelcnn-error-", suffix=".txt", delete=False) as file:
            traceback.print_exception(err, file=file)
        return f"{reason} (unforeseen: its traceback is in {file.name})"
    except OSError as write_error:  # e.g. a full disk
        return f"{reason} (unforeseen; its traceback could not be saved: {write_error.strerror})"


def run_app(main: Callable[[], object], config_dir: Path, config_name: str) -> None:
    """The `__main__` of every entry point: `check_command_line`, then the Hydra app `main`, whose failures
    outside the task function (composing the config, or any other of Hydra's) are one line too."""
    check_command_line(sys.argv, config_dir)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises them, instead of printing them in many lines
    with exit_on_user_error():
        try:
            main()
        except ConfigCompositionException as err:
            with initialize_config_dir(version_base="1.3", config_dir=str(config_dir.resolve())):  # Hydra's has ended
                args = [a for a in sys.argv[1:] if ("=" in a or a.startswith("~")) and not a.startswith("-")]
                raise UserError(override_error(err, args, config_name)) from None


# Keys and groups that moved (difflib may not find them): where each is now.
MOVED = {"scheduler": "optim/scheduler", "model.lr": "optim.lr", "model.weight_decay": "optim.weight_decay"}


def override_error(err: ConfigCompositionException, overrides: list[str], config_name: str) -> str:
    """Hydra's error composing `config_name` with `overrides`, in one line. An override of a key or group the
    config lacks (where Hydra's advice, `+key=value`, would add a key nothing reads) names the closest ones:
    keys of the config composed with the same group choices, and groups (difflib), and where MOVED ones went."""
    loader = GlobalHydra.instance().hydra.config_loader  # the one that failed (a sweep's, in sweep_check)
    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = loader.list_groups("")
    for group in groups:  # the list grows as it goes: nested groups (optim/scheduler) too
        groups += [f"{group}/{g}" for g in loader.list_groups(group)]
    chosen = [o.input_line for o in parsed if o.key_or_group in groups and not o.is_sweep_override()]
    config = OmegaConf.to_container(loader.load_configuration(config_name, chosen, RunMode.RUN), resolve=False)

    def paths(node: dict, prefix: str = "") -> list[str]:
        return [path for k, v in node.items() if k != "hydra"
                for path in [prefix + k, *(paths(v, f"{prefix}{k}.") if isinstance(v, dict) else [])]]

    keys = paths(config)
    leaves = [key for key in keys if not any(k.startswith(key + ".") for k in keys)] + groups
    for override in parsed:
        key, value = override.key_or_group, override.input_line.partition("=")[2]
        if override.is_add() or override.is_force_add() or key.startswith("hydra") or key in keys + groups:
            continue
        close = [MOVED[key]] if key in MOVED else []
        close += [c for c in difflib.get_close_matches(key, leaves, n=3) if c not in close]
        choices = " or ".join(f"{c}={value}" if value else c for c in close)
        given = f" ({' '.join(chosen)})" if chosen else ""
        return f"{key} is not a key or group of the config{given}" + (f": did you mean {choices}?" if close else "")
    lines = [*str(err).splitlines(), *str(err.__cause__ or "").splitlines()[:1]]
    return " ".join(line for line in lines if not line.startswith("To append"))  # the wrong advice here


def check_command_line(argv: list[str], config_dir: str | Path) -> None:
    """Before Hydra, whose own messages are a dozen lines: an override its grammar cannot read (a path
    with non-ASCII letters, commas, brackets...) gets one `error:` line saying how to quote it, and a
    `group=option` (model=gated, sweeps like model=pixelcnn,gated, lists like logger=[tensorboard,csv])
    naming an option that `config_dir/group/` lacks gets one with the choices; exit 2."""
    config_dir = Path(config_dir)
    for arg in argv[1:]:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or arg.startswith("-"):  # flags (-m, --config-name x) and their values
            continue
        try:
            OverridesParser.create().parse_overrides([arg])
        except OverrideParseException as err:
            fail(f"Hydra cannot read {arg!r} ({str(err).splitlines()[0]}): quote the value, single quotes for "
                 f"the shell and double quotes for Hydra, e.g. {as_override(key, value)}")
        group = config_dir / key
        if value.startswith("[") and value.endswith("]"):  # several options at once: logger=[tensorboard,csv]
            value = value[1:-1]
        if key.startswith("hydra") or not group.is_dir() or any(c in value for c in "()[]{}$"):
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        for option in (v.strip() for v in value.split(",")):
            if option and option != "null" and option not in choices:
                fail(f"{key}={option} is not an option: choose one of {', '.join(choices)} (files in {group})")


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def pick_device(name: str) -> torch.device:
    """The `device=` key of sample.py, evaluate.py and train_classifier.py (checked by `validate`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    return torch.device(name)


def load_checkpoint_model(cfg: DictConfig, outputs: str) -> tuple[Path, ImageModel, Path]:
    """The checkpoint file of `ckpt` (a run dir: its best), its model on `device`, and the output folder:
    `out`, else <run dir>/`outputs` (or next to the checkpoint), checked writable before any work."""
    device = pick_device(cfg.device)
    ckpt = resolve_checkpoint(cfg.ckpt)
    module = load_module(ckpt, device)
    return ckpt, module, check_out_dir(cfg.out if cfg.out else Path(run_dir_of(ckpt) or ckpt.parent) / outputs)


def checkpoint_data(module: ImageModel, data_root: str | None):
    """The data `module` was trained on (older checkpoints: Fashion-MNIST), set up: training's test split;
    one line says so if its splits changed since (`data.changed_splits`)."""
    from pixelcnn.data import changed_splits, setup_datamodule  # late: Lightning, for the modes that read data only

    settings = dict(module.data or {})
    saved = settings.pop("splits", None)
    datamodule = setup_datamodule(data_root, module.image_size, module.levels, **settings)
    if change := changed_splits(saved, datamodule.fingerprints):
        print(f"warning: the data changed since this model was trained ({change}); using it as it is now",
              file=sys.stderr, flush=True)
    return datamodule


class NoVendorTips(logging.Filter):
    """Drops Lightning's advertisements from the log ("💡 Tip: ... install litlogger / litmodels"): they
    say nothing about the run. Lightning has no switch for them; conf/train.yaml puts this filter on the
    logger that prints them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")
