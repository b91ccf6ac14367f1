"""Checks of user-supplied config values, so a bad value fails at once with one clear line.

Hydra already rejects unknown keys (the config is in struct mode); this module checks every
value's range and type, each command its own keys (`RULES`, `validate`), in one place.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path
from typing import Any, get_args

from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

from pixelcnn.ops.errors import UserError, config_items
from pixelcnn.likelihood import ARCHITECTURES, TRAINING_KEYS, ImageModel
from pixelcnn.pixelcnn_net import INPUT_KERNEL_MIN, odd_kernel
from pixelcnn.sampling import METHODS, valid_temperature


Rule = tuple[Callable[[Any], bool], str]  # (check, what is allowed)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # True == 1: a boolean is no number here


def _int(lo: int, hi: int | None = None) -> Rule:
    ok = lambda v: _real(v) and isinstance(v, int) and v >= lo and (hi is None or v <= hi)  # noqa: E731
    return ok, f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"


def _in(interval: str, allowed: str = "") -> Rule:
    """A number in `interval`, written as in math: "[0, 1)", "(0, inf)"."""
    lo, hi = map(float, interval[1:-1].split(","))

    def ok(v: Any) -> bool:
        return _real(v) and (lo < v if interval[0] == "(" else lo <= v) and (v < hi if interval[-1] == ")" else v <= hi)

    return ok, allowed or f"a number in {interval}"


# Lightning's meaning: a float is a fraction of the batches, an int a count of them.
LIMIT_BATCHES = ((lambda v: v is None or (isinstance(v, float) and 0 <= v <= 1) or _int(0)[0](v)),
                 "null (all), a fraction in [0.0, 1.0], or a number of batches >= 0")
POSITIVE = _in("(0, inf)", "a number > 0")
TEMPERATURES = ((lambda v: all(map(valid_temperature, v)) and len(v) > 0 if isinstance(v, (list, ListConfig))
                 else valid_temperature(v)), "a number > 0 (or a list of them)")


def _one_of(*choices: object) -> Rule:
    def ok(v: Any) -> bool:  # of the same type: True == 1 and 3.0 == 3, but neither is the setting
        return any(type(v) is type(c) and v == c for c in choices)

    return ok, "one of " + ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else str(c)
                                     for c in choices)


def _precision(v: Any) -> bool:
    from lightning.fabric.connector import _PRECISION_INPUT  # Lightning's own list (training loads lightning anyway)

    return _one_of("auto", *(value for kind in get_args(_PRECISION_INPUT) for value in get_args(kind)))[0](v)


def _int_list(example: str) -> Rule:
    ok = lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(_int(1)[0](d) for d in v)  # noqa: E731
    return ok, f"a non-empty list of integers >= 1, e.g. {example}"


SEED_RANGE = _int(0, 2**32 - 1)  # numpy's, which Lightning's seed_everything checks (in a traceback)
MAX_IMAGES = 10_000  # images drawn for one grid: more would not fit a PNG (nor, at once, memory)
Rules = dict[str, Rule]  # key -> (check, what is allowed); absent keys are skipped

# Each command's rules (`RULES`, by its config's name) are made of these groups, each written once; a value the
# library takes too is checked with its owner's test (the sampler's temperature and methods, the networks' kernels).
DATA: Rules = {  # the data group: training's, and the classifier's (a few of its keys, others addable)
    "data.levels": _int(2, 256),  # stored as uint8
    "data.image_size": _int(2, 28),
    **dict.fromkeys(("data.batch_size", "data.eval_batch_size"), _int(1)),
    **dict.fromkeys(("data.val_size", "data.test_size"), (lambda v: _int(1)[0](v) or _in("(0, 1)")[0](v),
                                                          "an integer >= 1 (images) or a fraction in (0, 1)")),
    "data.source": _one_of("fashion_mnist", "mnist", "folder", "array"),
    "data.channels": _one_of(1, 3),
    "data.split_seed": SEED_RANGE,
    "data.download": _one_of(True, False),
    "data.hflip": _one_of(True, False),
    "data.on_device": _one_of("auto", True, False),
}
QUALITY_N: Rules = {"quality_n": (lambda v: _int(0)[0](v) and v != 1, "0 (skip) or an integer >= 2")}
DEVICE: Rules = {"device": _one_of("auto", "cpu", "cuda")}  # sample.py, evaluate.py, train_classifier.py
TRAINING: Rules = {  # train.py, and bench.py, which measures the same run
    **DATA, "seed": SEED_RANGE, **QUALITY_N,
    "model.filters": _int(2),
    "model.residual_blocks": _int(0),
    "model.input_kernel": (lambda v: odd_kernel(v, INPUT_KERNEL_MIN), f"an odd integer >= {INPUT_KERNEL_MIN}"),
    "model.dilations": _int_list("[1, 2, 1, 4]"),
    "model.centre_input": _one_of(True, False),
    "model.head": _one_of("relu", "elu"),
    "model.channels": _int(1),
    "model.layers": _int(1),
    "model.kernel_size": (odd_kernel, "an odd integer >= 1"),
    "model.dropout": _in("[0, 1)"),
    "model.ema_decay": _in("[0, 1)", "a number in [0, 1) (0: no weight average)"),
    # auto: the data's class count; > 0: checked against the data's once it is read (training.resolve_num_classes)
    "model.num_classes": (lambda v: v == "auto" or _int(0)[0](v), "an integer >= 0 (0: unconditional) or auto "
                          "(one class per class of the data)"),
    "optim.lr": POSITIVE,
    "optim.weight_decay": _in("[0, inf)", "a number >= 0"),
    "optim.scheduler.name": _one_of("none", "cosine", "plateau"),
    "optim.scheduler.warmup_steps": _int(0),
    "optim.scheduler.final_lr_ratio": _in("[0, 1]"),
    "optim.scheduler.factor": _in("(0, 1)"),
    "optim.scheduler.patience": _int(0),
    "optim.scheduler.min_lr_ratio": _in("[0, 1]"),
    "trainer.max_epochs": (lambda v: _int(1)[0](v) or _one_of(-1)[0](v), "an integer >= 1 (or -1: no limit)"),
    "trainer.max_time": (lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", v)
                                                 is not None), 'null or "DD:HH:MM:SS", e.g. "00:00:15:00"'),
    "trainer.accelerator": _one_of("auto", "cpu", "gpu", "cuda"),
    "trainer.devices": (lambda v: _one_of("auto", -1)[0](v) or _int(1)[0](v) or (
        isinstance(v, (list, ListConfig)) and len(v) > 0 and len(set(v)) == len(v) and all(_int(0)[0](d) for d in v)),
        "a count >= 1, -1 or auto (every device), or a list of distinct device indices, e.g. [0, 1]"),
    "trainer.num_nodes": _int(1),
    "trainer.precision": (_precision, "auto or a Lightning precision: 32-true, bf16-mixed, 16-mixed, bf16-true, "
                                      "16-true, 64-true (or 32, 16, bf16, 64)"),
    # The strategies the data sharding (`BatchLoader`) and the exact val/test reduction are tested with.
    "trainer.strategy": _one_of("auto", "ddp"),
    "trainer.check_val_every_n_epoch": (lambda v: v is None or _int(1)[0](v),
                                        "an integer >= 1 or null (validate by trainer.val_check_interval batches)"),
    **dict.fromkeys(("trainer.limit_val_batches", "trainer.limit_test_batches"), LIMIT_BATCHES),
    "trainer.log_every_n_steps": _int(1),
    "trainer.max_steps": (lambda v: _int(1)[0](v) or _one_of(-1)[0](v), "an integer >= 1 (or -1: no limit)"),
    "trainer.limit_train_batches": LIMIT_BATCHES,  # batches of data.batch_size: optimizer steps
    # Lightning knobs a user adds (+trainer.<key>=...), in batches of data.batch_size like the limits.
    "trainer.overfit_batches": LIMIT_BATCHES,
    "trainer.val_check_interval": (lambda v: (isinstance(v, float) and 0 < v <= 1) or _int(1)[0](v),
                                   "a fraction of the epoch in (0.0, 1.0] or a number of batches >= 1"),
    "trainer.fast_dev_run": (lambda v: isinstance(v, bool) or _int(0)[0](v), "true, false or a number of batches >= 0"),
    "trainer.gradient_clip_val": (lambda v: v is None or _in("[0, inf)")[0](v),
                                  "null or a number >= 0 (0: no clipping)"),
    "trainer.gradient_clip_algorithm": _one_of(None, "norm", "value"),
    "trainer.accumulate_grad_batches": _int(1),
    "speed.compile": _one_of("auto", True, False),
    "speed.compile_mode": _one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "speed.channels_last": _one_of("auto", True, False),
    "speed.matmul_precision": _one_of("highest", "high", "medium"),
    "sample.seed": SEED_RANGE,
    "sample.temperature": (valid_temperature, "a number > 0"),  # one grid temperature; lists are for sample.py
    "sample.n": _int(1, MAX_IMAGES),
    "sample.every_n_epochs": _int(0),
    "sample.method": _one_of(*METHODS),
    "checkpoint_every_n_steps": (lambda v: v is None or _int(1)[0](v), "null or an integer >= 1"),
    "progress_bar_refresh": _int(1),
    "early_stopping_patience": (lambda v: v is None or _int(1)[0](v), "null or an integer >= 1"),
}
# The drawing options of sample.py and evaluate.py.
DRAWING: Rules = {"seed": SEED_RANGE, **DEVICE, "method": _one_of(*METHODS), "scale": _int(1, 64)}
RULES: dict[str, Rules] = {
    "train": TRAINING,
    "bench": {**TRAINING, "bench.repeats": _int(1), "bench.warmup_batches": _int(0), "bench.train_batches": _int(1),
              "bench.epoch": _one_of("auto", "measure", "estimate"), "bench.sample_sizes": _int_list("[64, 1024]"),
              "bench.naive_max_n": _int(0), "bench.naive_repeats": _int(1)},
    "sample": {**DRAWING, "temperature": TEMPERATURES, "n": _int(1, MAX_IMAGES), "mode": _one_of("sample", "complete"),
               "rows": _int(0), "completions": _int(1, 64)},
    "evaluate": {**DRAWING, **QUALITY_N,
                 "temperature": (valid_temperature, "one temperature > 0 (of the quality samples)"),
                 "quality": _one_of(True, False), "batch_size": _int(1), "heatmaps": _int(0), "extremes": _int(1)},
    "classifier": {**DATA, "seed": SEED_RANGE, **DEVICE, "epochs": _int(1), "batch_size": _int(1), "lr": POSITIVE},
}


def check_out_dir(path: str | Path, key: str = "out") -> Path:
    """Raise a UserError now, before any work, if the output folder `path` could not be created
    or written (it is a file, or its nearest existing ancestor is); creates nothing."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())  # ends at "." or "/", which exist
    if not existing.is_dir():
        raise UserError(f"{key}={path} cannot be a folder: {existing} is a file; pass a folder for the outputs")
    try:  # a real write, not os.access: root passes access checks on read-only mounts and /proc
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{key}={path} cannot be written ({existing}: {err.strerror}): "
                        "pass a writable folder") from None
    return path


def check_sqlite(path: str | Path, key: str, table: str) -> None:
    """Refuse in one line an SQLite database (MLflow's, Optuna's) that exists and is not one, is damaged, is another
    program's (it has tables, but not `table`: it would be given this one's), or cannot be created: SQLAlchemy's
    errors are tracebacks, and MLflow retries an unwritable one for minutes."""
    path = Path(path)
    if not path.exists():
        check_out_dir(path.parent, key)
        return
    with path.open("rb") as file:  # SQLite takes an empty file for a new database
        if file.read(16) not in (b"", b"SQLite format 3\x00"):
            raise UserError(f"{key}: {path} is not an SQLite database: pass another file (a new one is created)")
    try:  # read-only: nothing in it changes
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as database:
            tables = {name for (name,) in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as err:
        raise UserError(f"{key}: {path} is a damaged SQLite database ({err}): restore it from a copy, or pass "
                        "another file (a new one is created)") from None
    if tables and table not in tables:
        raise UserError(f"{key}: {path} is another program's database (no {table} table): pass another file "
                        "(a new one is created)")


# Keys naming a file or folder. Hydra reads `out=2024` as the int 2024: it still names a folder (validate).
PATH_KEYS = ("ckpt", "ckpt_path", "init_from", "out", "images", "data_root",
             "data.root", "data.system_dir", "data.path", "bench.out")


def as_override(key: str, value: object) -> str:
    """`key=value` as it can be pasted into a shell: quoted for the shell and, in double quotes,
    for Hydra's override grammar, unless the value only has characters both read as they are."""
    text = str(value)
    if re.fullmatch(r"[\w/.+%@:-]+", text, re.ASCII):
        return f"{key}={text}"
    hydra_quoted = '"' + text.replace('"', '\\"').replace("${", "\\${") + '"'
    return "'" + f"{key}={hydra_quoted}".replace("'", "'\\''") + "'"


def check_options(given: Iterable[str], accepted: Iterable[str], prefix: str, owner: str) -> None:
    """Raise a UserError naming the first of `given` that `accepted` lacks (keys `prefix`.name)."""
    accepted = sorted(accepted)
    if unknown := sorted(set(given) - set(accepted)):
        raise UserError(f"{prefix}.{unknown[0]} is not an option of {owner}: its options are {', '.join(accepted)}")


def network_error(model: dict) -> str | None:
    """What is wrong with the network options of a config's model group or a checkpoint's hyperparameters: an
    unknown arch, or an option its architecture does not take (typically a preset written for the other), or None."""
    if (arch := model.get("arch")) not in ARCHITECTURES:
        return f"model.arch={arch!r} is unknown: choose one of {sorted(ARCHITECTURES)}"
    # The model's, not its network's; `net` is the built network itself, never a setting (config or checkpoint).
    own = {*inspect.signature(ImageModel).parameters, *TRAINING_KEYS} - {"net"}
    # Less those the model gives every network (levels, num_classes, image_channels).
    options = sorted(set(inspect.signature(ARCHITECTURES[arch]).parameters) - own)
    if unknown := sorted(set(model) - own - set(options)):
        return f"model.{unknown[0]} is not an option of model.arch={arch}: its options are {', '.join(options)}"
    return None


# Trainer arguments that the run gives the Trainer itself (`training.build_trainer`, `callbacks.build_callbacks`): a
# value added with +trainer.<key> would be replaced without a word, or refused by Lightning for the run's own callbacks.
TRAINER_SET_BY_RUN = {
    "logger": "choose the loggers with the logger group (logger=csv, logger=[tensorboard,csv]) or none with '~logger'",
    "default_root_dir": "the run writes into its run dir: set hydra.run.dir (ckpt_path=<run dir> continues one)",
    "callbacks": "the run's callbacks follow the config (checkpoint_every_n_steps, early_stopping_patience, sample.*)",
    "plugins": "the run writes its checkpoints with its own writer (each whole or not at all)",
    "enable_checkpointing": "the run always checkpoints: its resume points, and the best model that its test scores",
    "barebones": "the run's loggers, checkpoints and callbacks need Lightning's full loop, which barebones turns off",
    "use_distributed_sampler": "the run's own loader shards the data across DDP ranks (data.BatchLoader), always",
}


def combination_error(cfg: DictConfig, command: str) -> str | None:
    """What is wrong with values of `command`'s config that are each valid but do not go together, or None."""
    select = lambda key: OmegaConf.select(cfg, key, default=None)  # noqa: E731
    if command == "sample" and select("mode") == "complete":  # image completion
        if isinstance(select("temperature"), ListConfig):
            return "mode=complete takes one temperature, not a list"
        if select("method") != "fast":
            return f"mode=complete uses the fast (incremental) sampler only: drop method={select('method')}"
        if select("label") == "all":
            return "mode=complete takes label=<one class> (test images of that class) or no label, not label=all"
    if command not in ("train", "bench"):
        return None
    if error := network_error({k: v for k, v in OmegaConf.to_container(cfg.model).items() if not k.startswith("_")}):
        return error  # Hydra's _target_ and such are not the model's
    from lightning import Trainer  # late: sample.py and evaluate.py validate no Trainer

    arguments = set(inspect.signature(Trainer).parameters)  # +trainer.<key>: a Lightning knob, or nothing reads it
    if unknown := sorted(k for k in cfg.trainer if not k.startswith("_") and k not in arguments):
        close = difflib.get_close_matches(unknown[0], arguments, n=3)
        return (f"trainer.{unknown[0]} is not an argument of Lightning's Trainer"
                + (f": did you mean {' or '.join(f'trainer.{c}' for c in close)}?" if close else ""))
    if owned := sorted(k for k in cfg.trainer if k in TRAINER_SET_BY_RUN):
        return f"trainer.{owned[0]} is not a setting here: {TRAINER_SET_BY_RUN[owned[0]]}"
    if select("optim.scheduler.name") == "cosine" and select("trainer.max_epochs") == select("trainer.max_steps") == -1:
        return "optim/scheduler=cosine needs a known run length: set trainer.max_epochs or trainer.max_steps"
    if select("optim.scheduler.name") == "plateau" and select("trainer.limit_val_batches") == 0:
        return "optim/scheduler=plateau steps on val bits/dim: it needs a validation (trainer.limit_val_batches > 0)"
    if select("optim.scheduler.name") == "plateau" and select("trainer.check_val_every_n_epoch") is None:
        return "optim/scheduler=plateau steps at an epoch's validation: set trainer.check_val_every_n_epoch (not null)"
    if select("ckpt_path") and select("init_from"):
        return "pass ckpt_path (continue that run, in its dir) or init_from (a new run from its weights), not both"
    if select("data.channels") == 3:  # the colour masks split each layer's channels into R, G, B groups
        for key, least in (("model.filters", 6), ("model.channels", 3)):  # seed: half of filters in the blocks
            if (value := select(key)) is not None and value < least:
                return (f"{key}={value} is too small for data.channels=3: it must be >= {least} (each layer's "
                        "channels are split into R, G, B groups)")
    # The model's copies (stored in checkpoints) must match the data.
    for model_key, key in (("levels", "levels"), ("image_size", "image_size"), ("image_channels", "channels")):
        model_value, data_value = select(f"model.{model_key}"), select(f"data.{key}")
        if model_value is not None and data_value is not None and model_value != data_value:
            return (f"model.{model_key}={model_value} differs from data.{key}={data_value}: set data.{key} "
                    f"instead (model.{model_key} follows it)")
    return None


def validate(cfg: DictConfig, command: str) -> None:
    """Raise UserError naming the first key of `command`'s config (a key of `RULES`: train, bench,
    sample, evaluate, classifier) whose value is out of range. Every float key must be finite (inf
    and nan pass `> 0` style checks but mean nothing as a setting)."""
    # Unresolved: interpolations point at keys that are checked themselves (and ${hydra:...} needs a run).
    for key, value in config_items(OmegaConf.to_container(cfg, resolve=False)):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value} is invalid: it must be a finite number")
    for key in PATH_KEYS:
        if isinstance(value := OmegaConf.select(cfg, key, default=None), bool):
            raise UserError(f"{key}={str(value).lower()} is invalid: it must be a path")
        if isinstance(value, (int, float)):
            with read_write(cfg):
                OmegaConf.update(cfg, key, str(value))
    for key, (ok, allowed) in RULES[command].items():
        value = OmegaConf.select(cfg, key, default=...)  # ...: a key this config lacks
        if value is not ... and not ok(value):
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            raise UserError(f"{key}={shown!r} is invalid: it must be {allowed}")
    if message := combination_error(cfg, command):
        raise UserError(message)
