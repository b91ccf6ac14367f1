"""Finding and loading this project's checkpoints, with one clear error when that fails."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pixelcnn.config import UserError
from pixelcnn.run_dirs import fresh_dir, resume_dir_of


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
            step = torch.load(path, map_location="cpu", weights_only=True).get("global_step", -1)
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
    wanted = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if not k.startswith("_")}
    # Checkpoints from before the scheduler option trained at a constant lr.
    saved = {"scheduler": {"name": "none"}, **checkpoint["hyper_parameters"]}
    for key in sorted(set(wanted) | set(saved)):
        if key not in saved or key not in wanted or saved[key] != wanted[key]:
            raise UserError(f"ckpt_path={path} was trained with model.{key}={saved.get(key, '<unset>')!r}, this "
                            f"config has {wanted.get(key, '<unset>')!r}: a resumed run continues the saved model, "
                            "so drop that override (or start a new run from scratch)")


def finished_run(run_dir: Path, max_epochs: int, max_time: str | None = None) -> str | None:
    """Why the run in `run_dir` is over, or None if resuming it would train more: it wrote its
    metrics.json (it ended) and reached `max_epochs` or `max_time` ("DD:HH:MM:SS"), or was stopped
    early (a resume restores the stopping state and the time spent, so it would stop at once)."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    try:
        epochs = json.loads(metrics_file.read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(epochs, int) and max_epochs != -1 and epochs >= max_epochs:
        return f"it trained {epochs} epochs, trainer.max_epochs={max_epochs}: pass trainer.max_epochs=<more> to extend it"
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        callbacks = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
    except Exception:  # noqa: BLE001 - no readable last.ckpt: the resume itself reports that
        return None
    if any(key.startswith("EarlyStopping") and state.get("stopped_epoch", 0) > 0 for key, state in callbacks.items()):
        return f"early stopping ended it after {epochs} epochs"
    if max_time:
        days, hours, minutes, seconds = (int(part) for part in max_time.split(":"))
        limit = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        if callbacks.get("Timer", {}).get("time_elapsed", {}).get("train", 0) >= limit:
            return f"it trained for trainer.max_time={max_time}: pass a larger trainer.max_time to extend it"
    return None


def with_resume_overrides(argv: list[str]) -> list[str]:
    """`train.py ckpt_path=<run> [more]` -> argv with the run's own overrides (its
    `.hydra/overrides.yaml`) put before the user's, so a resumed run has the config it was
    started with (experiment=..., model=..., data.root=...) without retyping it."""
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]  # not flags, nor their values
    resume = [a.split("=", 1)[1] for a in overrides if a.startswith("ckpt_path=")]
    if not resume or not resume[-1] or "-m" in argv or "--multirun" in argv:
        return argv
    run_dir = resume_dir_of(resume[-1])
    saved = Path(run_dir) / ".hydra" / "overrides.yaml" if run_dir else None
    if saved is None or not saved.is_file():
        return argv
    # Not the ones already given: Lightning's DDP processes re-run this (already rewritten) command.
    original = [o for o in OmegaConf.load(saved) if not str(o).startswith(("ckpt_path=", "hydra.")) and o not in argv]
    if not original:
        return argv
    print(f"[pixelcnn] resuming: re-applying the run's overrides from {saved}: {' '.join(original)}",
          flush=True)
    first = argv.index(overrides[0])
    return argv[:first] + [str(o) for o in original] + argv[first:]


def resume_run_dir(ckpt_path: str | None, default: str) -> str:
    """Hydra resolver: a resumed run writes into the run dir its checkpoint came from; any other
    run into `default`, which `pixelcnn.cli.RunDirGuard` then reserves (`fresh_dir`: with a suffix
    if another run took the name). No side effect here: OmegaConf also evaluates a value that a
    config merge replaces (bench.yaml's run dir), and that must not create a folder."""
    return (resume_dir_of(ckpt_path) if ckpt_path else None) or default


def resume_output_subdir(ckpt_path: str | None, stamp: str) -> str:
    """Hydra resolver: where a run's resolved config goes. A resumed run must not overwrite the
    `.hydra/` of the run it continues (it is that run's record), so it gets a sub-dir."""
    return f".hydra/resume-{stamp}" if ckpt_path else ".hydra"


def sweep_subdir(job_num: int, override_dirname: str, max_length: int = 120) -> str:
    """Hydra resolver: a sweep job's folder, named by its overrides, shortened (with a hash to
    stay unique) when they would exceed a file name's length limit."""
    if len(override_dirname) <= max_length:
        return f"{job_num}_{override_dirname}" if override_dirname else str(job_num)
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return f"{job_num}_{override_dirname[:max_length]}..{digest}"


def register_resolvers() -> None:
    # use_cache: a sweep dir is reserved once per config (Hydra copies the cache into each job's config).
    for name, resolver, cached in (("resume_run_dir", resume_run_dir, False), ("fresh_dir", fresh_dir, True),
                                   ("resume_output_subdir", resume_output_subdir, False),
                                   ("sweep_subdir", sweep_subdir, False)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=cached)


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
