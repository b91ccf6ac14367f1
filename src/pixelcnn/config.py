"""Checks of user-supplied config values, so a bad value fails at once with one clear line.

Hydra already rejects unknown keys (the config is in struct mode); this module checks ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2."""


def _int(lo: int, hi: int | None = None) -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)  # noqa: E731
    return ok, f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"


def _positive_float() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0), "a number > 0"


def _odd_int() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1), "an odd integer >= 1"


def _temperatures() -> tuple[Callable[[Any], bool], str]:
    positive, _ = _positive_float()
    ok = lambda v: all(positive(t) for t in v) and len(v) > 0 if isinstance(v, (list, ListConfig)) else positive(v)  # noqa: E731
    return ok, "a number > 0 (or a list of them)"


# key -> (check, what is allowed). Keys absent from a config (e.g. `filters` for model=gated) are skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.levels": _int(2, 256),
    "data.image_size": _int(2, 28),
    "data.batch_size": _int(1),
    "data.eval_batch_size": _int(1),
    "data.val_size": _int(1, 59_999),
    "model.filters": _int(2),
    "model.residual_blocks": _int(0),
    "model.input_kernel": _odd_int(),
    "model.channels": _int(1),
    "model.layers": _int(1),
    "model.kernel_size": (lambda v: isinstance(v, int) and v >= 3 and v % 2 == 1, "an odd integer >= 3"),
    "model.dropout": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
    "model.num_classes": (lambda v: v in (0, 10), "0 (unconditional) or 10 (Fashion-MNIST classes)"),
    "model.lr": _positive_float(),
    "model.weight_decay": (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
    "trainer.max_epochs": (lambda v: isinstance(v, int) and (v >= 1 or v == -1), "an integer >= 1 (or -1: no limit)"),
    "sample.temperature": _positive_float(),  # one grid temperature; lists are for sample.py
    "sample.n": _int(1),
    "sample.every_n_epochs": _int(0),
    "sample.method": (lambda v: v in ("fast", "naive"), "'fast' or 'naive'"),
    "temperature": _temperatures(),
    "n": _int(1),
    "method": (lambda v: v in ("fast", "naive"), "'fast' or 'naive'"),
    "early_stopping_patience": (lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer >= 1"),
    "quality_n": (lambda v: isinstance(v, int) and (v == 0 or v >= 2), "0 (skip) or an integer >= 2"),
    # keys of the evaluate / classifier / sample commands
    "epochs": _int(1),
    "batch_size": _int(1),
    "lr": _positive_float(),
    "heatmaps": _int(0),
    "extremes": _int(1),
    "completions": _int(1),
    "rows": _int(0),
}


def validate(cfg: DictConfig) -> None:
    """Raise UserError naming the first key whose value is out of range."""
    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if isinstance(value, str) and value == "__absent__":
            continue
        if not ok(value):
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            raise UserError(f"{key}={shown!r} is invalid: it must be {allowed}")
