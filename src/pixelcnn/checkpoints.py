"""Finding and loading this project's checkpoints, with one clear error when that fails."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pixelcnn.config import UserError


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run dir / its checkpoints dir (then `prefer`: best or last)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        best = sorted(folder.glob("best-*.ckpt"))
        candidates = (best[-1:] if prefer == "best" else []) + [folder / "last.ckpt"] + best[-1:]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"ckpt={path} is a folder without checkpoints: pass a .ckpt file or a run dir "
                            f"that has checkpoints/last.ckpt")
        return found
    if not path.is_file():
        raise UserError(f"ckpt={path} does not exist: pass a .ckpt file or a run dir (e.g. outputs/<date>/<time>)")
    return path


def resume_run_dir(ckpt_path: str | None, default: str) -> str:
    """Hydra resolver: a resumed run writes into the run dir its checkpoint came from."""
    if not ckpt_path:
        return default
    path = Path(ckpt_path)
    if path.is_dir():
        return str(path.parent if path.name == "checkpoints" else path)
    return str(path.parent.parent if path.parent.name == "checkpoints" else default)


def sweep_subdir(job_num: int, override_dirname: str, max_length: int = 120) -> str:
    """Hydra resolver: a sweep job's folder, named by its overrides, shortened (with a hash to
    stay unique) when they would exceed a file name's length limit."""
    if len(override_dirname) <= max_length:
        return f"{job_num}_{override_dirname}" if override_dirname else str(job_num)
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return f"{job_num}_{override_dirname[:max_length]}..{digest}"


def register_resolvers() -> None:
    for name, resolver in (("resume_run_dir", resume_run_dir), ("sweep_subdir", sweep_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def load_module(path: str | Path, map_location: str | torch.device = "cpu"):
    """Load a `PixelCNNModule` from a checkpoint (file or run dir), in eval mode."""
    from pixelcnn.module import PixelCNNModule  # late import: keeps config/CLI errors fast

    path = resolve_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"ckpt={path} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "arch" not in hparams or "state_dict" not in checkpoint:
        raise UserError(f"ckpt={path} is not a checkpoint of this project (no PixelCNN hyperparameters in it)")
    module = PixelCNNModule(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(map_location).eval()
