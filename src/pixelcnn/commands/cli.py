"""What every command-line entry point shares: a user mistake is one line on stderr and exit
status 2, and leaves no half-written output behind; `device=` and `ckpt=` mean the same everywhere."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException, SearchPathException
from omegaconf import DictConfig, OmegaConf

from pixelcnn.ops.checkpoints import load_module, resolve_checkpoint
from pixelcnn.ops.rules import as_override, check_out_dir, validate
from pixelcnn.ops.errors import (UserError, WriteError, config_items, error_line, override_error, raised_in,
                                 user_errors_unwrapped)
from pixelcnn.likelihood import ImageModel
from pixelcnn.ops.resources import pick_device
from pixelcnn.ops.run_dirs import fresh_dir, remove_own_dir, run_dir_of

# A log line that cannot be written (train.log on a full disk) is dropped, not reported with a
# traceback per line: the command's own writes report a full disk, once (`exit_on_user_error`).
logging.raiseExceptions = False


@contextmanager
def exit_on_user_error(cleanup_dir: str | Path | None = None):
    """Turn UserError (data errors included) and unwritable outputs into `error: ...` + exit 2, and
    any other exception into one line too (`error_line`: it names the file holding its traceback), exit 1.
    `cleanup_dir` (the run dir) is removed only if this run created it (`remove_own_dir`) and
    it holds no checkpoint: one that does can be resumed (e.g. after a full disk is cleared)."""
    try:
        with user_errors_unwrapped():
            yield
    except Exception as err:  # noqa: BLE001 - every failure is one line
        message = str(err) if isinstance(err, UserError) else error_line(err)
        if cleanup_dir is not None and Path(cleanup_dir).is_dir():
            # Kept if it has a checkpoint to resume from (each one is whole: `callbacks.AtomicCheckpointIO`).
            if not any((Path(cleanup_dir) / "checkpoints").glob("*.ckpt")):
                remove_own_dir(cleanup_dir)
            elif isinstance(err, WriteError):
                resume = as_override("ckpt_path", cleanup_dir)
                message += f"; the run resumes from its last complete checkpoint with {resume}"
        fail(message, 2 if isinstance(err, UserError) else 1)


def run_app(main: Callable[[], object], config_dir: Path, config_name: str) -> None:
    """The `__main__` of every entry point: `check_command_line`, then the Hydra app `main`, whose failures
    outside the task function (composing the config, or any other of Hydra's) are one line too."""
    check_command_line(sys.argv, config_dir, config_name)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises them, instead of printing them in many lines
    with exit_on_user_error():
        try:
            main()
        except ConfigCompositionException as err:
            with initialize_config_dir(version_base="1.3", config_dir=str(config_dir.resolve())):  # Hydra's has ended
                args = [a for a in sys.argv[1:] if ("=" in a or a.startswith("~")) and not a.startswith("-")]
                raise UserError(override_error(err, args, config_name)) from None
        except (ValueError, SearchPathException, SystemExit) as err:
            # Hydra's checks of its own flags (-m with --cfg, --resolve without --cfg, --config-dir, --package), made
            # in its own code before any task runs, are usage errors.
            if not raised_in(err, "hydra/_internal/"):
                raise
            if isinstance(err, SystemExit):  # 1: after the line Hydra printed itself; 0: --help and such
                sys.exit(2 if err.code else err.code)
            raise UserError(f"{err}: see python {Path(sys.argv[0]).name} --help") from None


# The groups a key may be added to (+group.key=value), by config: their owners check the added keys (Lightning's
# Trainer, the network's constructor, the classifier's data module); a key added anywhere else is read by nothing.
ADDABLE = {"train": ("trainer", "model"), "bench": ("trainer", "model"), "classifier": ("data",)}


def check_command_line(argv: list[str], config_dir: Path, config_name: str) -> None:
    """Before Hydra, whose own messages are a dozen lines: an override its grammar cannot read (a path
    with non-ASCII letters, commas, brackets...) gets one `error:` line saying how to quote it, a
    `group=option` (model=gated, sweeps like model=pixelcnn,gated, lists like logger=[tensorboard,csv])
    naming an option that `config_dir/group/` lacks gets one with the choices, and a key added with `+`
    (or `++`, unless the config has it) outside the groups of `ADDABLE` (it would be silently ignored) gets one;
    exit 2."""
    addable = ADDABLE.get(config_name, ())
    # Hydra also looks for group options in the user's config dirs: then it names a missing option itself.
    searched = any(arg.startswith(("--config-dir", "-cd", "hydra.searchpath")) for arg in argv[1:])
    for arg in argv[1:]:
        if arg.partition("=")[0] == "--experimental-rerun":  # Hydra's: it unpickles its file, which can run any code
            fail(f"{arg} is not taken here: it would unpickle a file, and a file read is data, never code; rerun "
                 f"a run with its overrides (in its .hydra/overrides.yaml), or resume it with ckpt_path=<run dir>")
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or arg.startswith("-"):  # flags (-m, --config-name x) and their values
            continue
        try:
            OverridesParser.create().parse_overrides([arg])
        except OverrideParseException as err:
            fail(f"Hydra cannot read {arg!r} ({str(err).splitlines()[0]}): quote the value, single quotes for "
                 f"the shell and double quotes for Hydra, e.g. {as_override(key, value)}")
        if arg.startswith("+") and not (config_dir / key).is_dir() and key.split(".")[0] not in ("hydra", *addable):
            if arg.startswith("++") and has_key(argv, config_dir, config_name, key):
                continue  # ++ also overrides a key the config has
            where = f"only keys of {' and '.join(addable)} can be added" if addable else "no key can be added here"
            fail(f"{key} is not an option: {arg.partition('=')[0]} adds a key that nothing reads ({where}); "
                 f"python {Path(argv[0]).name} --cfg job lists the keys")
        group = config_dir / key
        value = value.removeprefix("[").removesuffix("]")  # several options at once: logger=[tensorboard,csv]
        if searched or key.startswith("hydra") or not group.is_dir() or any(c in value for c in "()[]{}$"):
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        for option in (v.strip() for v in value.split(",")):
            if option and option not in choices:  # null too: Hydra takes no null for a group on the command line
                leave_out = f" or leave the group out with '~{key}'" if option == "null" else ""
                fail(f"{key}={option} is not an option: choose one of {', '.join(choices)} "
                     f"(files in {group}){leave_out}")


def has_key(argv: list[str], config_dir: Path, config_name: str, key: str) -> bool:
    """Whether the config of the command line, less its added (+, ++) keys and its sweeps of keys' values (they
    change no key), has `key` (one without a value yet, ???, too). True where it cannot tell: a config that does
    not compose (Hydra then says why), or a sweep of a group's options (each job has keys of its own)."""
    with suppress(HydraException), initialize_config_dir(version_base="1.3", config_dir=str(config_dir.resolve())):
        overrides = OverridesParser.create().parse_overrides([a for a in argv[1:] if "=" in a and a[0] not in "+-"])
        if any(o.is_sweep_override() and (config_dir / o.key_or_group).is_dir() for o in overrides):
            return True
        config = compose(config_name, [o.input_line for o in overrides if not o.is_sweep_override()])
        return key in dict(config_items(OmegaConf.to_container(config, resolve=False)))
    return True


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


@contextmanager
def load_checkpoint_model(cfg: DictConfig, command: str, outputs: str) -> Iterator[tuple[Path, ImageModel, Path]]:
    """After `validate`(cfg, `command`), for the work of a command: the checkpoint file of `ckpt` (a run dir: its
    best), its model on `device`, and the output folder, checked writable before any work, so that no call
    replaces a file that another wrote: `out` if new or empty, else a new <run dir>/`outputs` (`outputs_1`, ... for
    later calls; next to a checkpoint file outside a run dir), removed again if the work fails."""
    validate(cfg, command)
    ckpt = resolve_checkpoint(cfg.ckpt)
    module = load_module(ckpt, pick_device(cfg.device))
    out = Path(cfg.out or fresh_dir(str(Path(run_dir_of(ckpt) or ckpt.parent) / outputs)))
    if out.is_dir() and any(out.iterdir()):  # out=, or the name fresh_dir falls back to with no suffix left
        raise UserError(f"out={out} already holds files: pass a new or empty folder (no call replaces another's "
                        f"files; without out=, each call of {command}.py writes into a new folder of the run dir)")
    try:
        yield ckpt, module, check_out_dir(out)
    except BaseException:
        remove_own_dir(out)  # if this call made it (`run_dirs.fresh_dir`)
        raise


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
