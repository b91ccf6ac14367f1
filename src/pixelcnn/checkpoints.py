"""Finding, reading and loading this project's checkpoints (only weights and plain data are ever
unpickled), with one clear error when that fails; whether a checkpoint can resume a config."""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pixelcnn.config import UserError

STEP_CHECKPOINT = "step"  # checkpoints/step.ckpt: the every-N-steps checkpoint (checkpoint_every_n_steps)


def best_score(path: Path) -> float:
    """The val bits/dim in a `best-epochNNN-val_bpdX.ckpt` name (inf if it has none)."""
    match = re.search(r"val_bpd(\d+(?:\.\d+)?)", path.name)
    return float(match.group(1)) if match else math.inf


def resolve_checkpoint(path: str | Path, prefer: str = "best", key: str = "ckpt") -> Path:
    """A checkpoint file, or a run dir / its checkpoints dir (then `prefer`: best or last).
    `key` is the config key the path came from, for the error message."""
    if not str(path).strip():
        raise UserError(f"{key} is empty: pass a .ckpt file or a run dir (e.g. outputs/<date>/<time>)")
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        # Lowest val bits/dim, newest first among equals (a resumed run can add best-...-v1.ckpt).
        best = sorted(folder.glob("best-*.ckpt"), key=lambda p: (best_score(p), -p.stat().st_mtime))[:1]
        latest = latest_checkpoint([folder / "last.ckpt", folder / f"{STEP_CHECKPOINT}.ckpt"])
        candidates = (best if prefer == "best" else []) + latest + best
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"{key}={path} is a folder without checkpoints: pass a .ckpt file or a run dir "
                            f"that has checkpoints/last.ckpt")
        return found
    if not path.is_file():
        raise UserError(f"{key}={path} does not exist: pass a .ckpt file or a run dir (e.g. outputs/<date>/<time>)")
    return path


def latest_checkpoint(paths: list[Path]) -> list[Path]:
    """Those of `paths` that exist, the one furthest into training first: by saved global step,
    and at equal steps last.ckpt (saved after the epoch's validation, so later than a step checkpoint)."""

    def progress(path: Path) -> tuple[int, bool]:
        try:
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1)  # mmap: no weights read
        except Exception:  # noqa: BLE001 - an unreadable file is tried last (read_checkpoint then says why)
            step = -1
        return step, path.name == "last.ckpt"

    return sorted((p for p in paths if p.is_file()), key=progress, reverse=True)


def read_checkpoint(path: Path, key: str = "ckpt") -> dict:
    """The checkpoint dict of one of this project's checkpoint files, or a one-line UserError.
    Only tensors and plain data are unpickled (weights_only): a file from someone else cannot run
    code, and one that tries is refused like any other foreign file."""
    if not zipfile.is_zipfile(path):  # torch.save's format; a truncated file has lost the zip's directory
        raise UserError(f"{key}={path} is not a readable PyTorch checkpoint (not a complete torch.save file: "
                        "truncated, damaged or something else)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only raises for anything but tensors and plain data
        raise UserError(f"{key}={path} is not a checkpoint of this project: it holds Python objects other than "
                        "weights, which are never loaded (they could run code)") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"{key}={path} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "arch" not in hparams or "state_dict" not in checkpoint:
        raise UserError(f"{key}={path} is not a checkpoint of this project (no PixelCNN hyperparameters in it)")
    return checkpoint


def check_resume(checkpoint: dict, model_cfg: DictConfig, path: Path) -> None:
    """A resumed run must build the network it saved: compare the checkpoint's hyperparameters
    with the composed `model` config (which `with_resume_overrides` normally makes equal)."""
    grey = {"image_channels": 1}  # configs and checkpoints from before colour were grey
    wanted = grey | {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if not k.startswith("_")}
    # Checkpoints from before the scheduler option trained at a constant lr; class names and the
    # data source come from the data, not the model config (`training.data_hparams`).
    saved = {"scheduler": {"name": "none"}, **grey, **checkpoint["hyper_parameters"]}
    for key in ("class_names", "data"):
        saved.pop(key, None)
    for key in sorted(set(wanted) | set(saved)):
        if key not in saved or key not in wanted or saved[key] != wanted[key]:
            raise UserError(f"ckpt_path={path} was trained with model.{key}={saved.get(key, '<unset>')!r}, this "
                            f"config has {wanted.get(key, '<unset>')!r}: a resumed run continues the saved model, "
                            "so drop that override (or start a new run from scratch)")


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """Load a `PixelCNNModule` from a checkpoint (file or run dir), in eval mode."""
    from pixelcnn.module import PixelCNNModule  # late import: keeps config/CLI errors fast

    path = resolve_checkpoint(path)
    checkpoint = read_checkpoint(path)
    try:
        module = PixelCNNModule(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:  # hyperparameters that do not build these weights
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        reason = lines[1] if len(lines) > 1 else lines[0]  # torch: a heading, then e.g. "size mismatch for ..."
        raise UserError(f"ckpt={path} is damaged: its hyperparameters do not match its weights ({reason})") from None
    return module.to(map_location).eval()
