"""The errors of the project: `UserError`, a mistake in what the user asked for (one line, exit status 2),
and how any other failure becomes one line (`error_line`, `override_error`; `config_items` lists a config's keys
for it, for `cli.has_key` and for `rules.validate`'s finite check). Every command reports through
`pixelcnn.commands.cli.exit_on_user_error`."""

from __future__ import annotations

import difflib
import errno
import os
import tempfile
import traceback
from contextlib import contextmanager

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2."""


class WriteError(UserError):
    """An output could not be written (full disk, read-only folder, ...): nothing half-written is left."""


# Writing failed for a reason the user can fix (where the output goes), not a bug: one line.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC, errno.EDQUOT}


@contextmanager
def user_errors_unwrapped():
    """Re-raise what wraps a user's mistake as the UserError it is."""
    try:
        yield
    except InstantiationException as err:  # hydra's `instantiate` wraps what a constructor raised
        raise err.__cause__ or err  # what the constructor raised: its own type and message
    except MissingMandatoryValue as err:  # a `???` key of the config, e.g. ckpt
        raise UserError(f"{err.full_key} is required: pass {err.full_key}=<value> "
                        "(e.g. ckpt=outputs/<date>/<time>)") from None
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised unless it is, or was caused by, a failed write
        while not isinstance(err, OSError) or err.errno not in WRITE_ERRNOS:  # Lightning/TensorBoard may wrap it
            if (err := err.__cause__ or (None if err.__suppress_context__ else err.__context__)) is None:
                raise
        fix = ("free some space there or pass another folder" if err.errno in (errno.ENOSPC, errno.EDQUOT)
               else "pass a writable folder")
        raise WriteError(f"cannot write {err.filename or 'the output folder'}: {err.strerror}; {fix} "
                         "for the outputs") from None


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


def raised_in(err: BaseException, package: str) -> bool:
    """Whether `err` was raised in `package`'s own code (a path such as "hydra/_internal/"), by the file of its
    last frame: Hydra's checks of its own flags, Lightning's trainer or loops refusing its settings."""
    return package.replace("/", os.sep) in traceback.extract_tb(err.__traceback__)[-1].filename


def config_items(node: object, prefix: str = ""):
    """Every key of a config as plain data (`OmegaConf.to_container`, unresolved: a ??? or ${...} value is a
    string) with its value, as a dotted path (a list's items as [i]), the keys holding others included; hydra's
    are left out."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, value in items:
        if k != "hydra":
            path = f"{prefix}[{k}]" if isinstance(node, list) else f"{prefix}.{k}" if prefix else str(k)
            yield path, value
            yield from config_items(value, path)


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
    try:
        config = OmegaConf.to_container(loader.load_configuration(config_name, chosen, RunMode.RUN), resolve=False)
    except ConfigCompositionException:  # the group choices themselves fail (+experiment=x twice): Hydra's line says why
        config = {}
    keys = [key for key, _ in config_items(config) if "[" not in key]  # an override names no list item
    leaves = [key for key in keys if not any(k.startswith(key + ".") for k in keys)] + groups
    for override in parsed:
        key, value = override.key_or_group, override.input_line.partition("=")[2]
        if override.is_add() and f"Multiple values for {key}." in str(err):  # Hydra's advice is for a defaults list
            return f"{key} is chosen by the config already: pass {key}={value} (without +) to change it"
        if override.is_add() or override.is_force_add() or key.startswith("hydra") or key in keys + groups:
            continue
        close = [MOVED[key]] if key in MOVED else []
        close += [c for c in difflib.get_close_matches(key, leaves, n=3) if c not in close]
        choices = " or ".join(f"{c}={value}" if value else c for c in close)
        given = f" ({' '.join(chosen)})" if chosen else ""
        return f"{key} is not a key or group of the config{given}" + (f": did you mean {choices}?" if close else "")
    lines = [*str(err).splitlines(), *str(err.__cause__ or "").splitlines()[:1]]
    return " ".join(line for line in lines if not line.startswith("To append"))  # the wrong advice here
