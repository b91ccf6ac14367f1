"""Finding, reading and loading this project's checkpoints (only weights and plain data are ever
unpickled), with one clear error when that fails; whether a checkpoint holds the network a config builds."""

from __future__ import annotations

import inspect
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pixelcnn.ops.rules import DATA, as_override, network_error

from pixelcnn.ops.errors import UserError
from pixelcnn.likelihood import ARCHITECTURES, TRAINING_KEYS, ImageModel

STEP_CHECKPOINT = "step"  # checkpoints/step.ckpt: the every-N-steps checkpoint (checkpoint_every_n_steps)


def resolve_checkpoint(path: str | Path, prefer: str = "best", key: str = "ckpt") -> Path:
    """A checkpoint file, or a run dir / its checkpoints dir (then `prefer`: best or last).
    `key` is the config key the path came from, for the error message."""
    if not str(path).strip():
        raise UserError(f"{key} is empty: pass a .ckpt file or a run dir (e.g. outputs/<date>/<time>)")
    if (path := Path(path)).is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{key}={path} does not exist: pass a .ckpt file or a run dir (e.g. outputs/<date>/<time>)")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path

    def val_bpd(path: Path) -> float:  # that in a `best-epochNNN-val_bpdX.ckpt` name
        match = re.search(r"val_bpd(\d+(?:\.\d+)?)", path.name)
        return float(match.group(1)) if match else float("inf")

    def progress(path: Path) -> tuple[int, bool]:  # by saved global step; at equal steps last.ckpt (saved later)
        try:  # mmap: no weights read
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1)
        except Exception:  # noqa: BLE001 - an unreadable file is tried last (read_checkpoint then says why)
            step = -1
        return step if isinstance(step, int) else -1, path.name == "last.ckpt"  # a file's value: any type

    # Lowest val bits/dim, newest first among equals (a resumed run can add best-...-v1.ckpt).
    best = sorted((p for p in folder.glob("best-*.ckpt") if p.is_file()),  # not a broken link
                  key=lambda p: (val_bpd(p), -p.stat().st_mtime))[:1]
    # The latest: the one furthest into training of last.ckpt and the step checkpoint.
    latest = sorted((p for p in (folder / "last.ckpt", folder / f"{STEP_CHECKPOINT}.ckpt") if p.is_file()),
                    key=progress, reverse=True)
    if found := next(iter((best if prefer == "best" else []) + latest + best), None):
        return found
    raise UserError(f"{key}={path} is a folder without checkpoints: pass a .ckpt file or a run dir "
                    f"that has checkpoints/last.ckpt")


def read_checkpoint(path: Path, key: str = "ckpt") -> dict:
    """The checkpoint dict of one of this project's checkpoint files, or a one-line UserError.
    Only tensors and plain data are unpickled (weights_only): a file from someone else cannot run
    code, and one that tries is refused like any other foreign file."""
    if not zipfile.is_zipfile(path):  # torch.save's format; a truncated file has lost the zip's directory
        raise UserError(f"{key}={path} is not a readable PyTorch checkpoint (not a complete torch.save file: "
                        "truncated, damaged or something else)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # weights read when used
    except pickle.UnpicklingError:  # what weights_only raises for anything but tensors and plain data
        raise UserError(f"{key}={path} is not a checkpoint of this project: it holds Python objects other than "
                        "weights, which are never loaded (they could run code)") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"{key}={path} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "arch" not in hparams or "state_dict" not in checkpoint:
        raise UserError(f"{key}={path} is not a checkpoint of this project (no PixelCNN hyperparameters in it)")
    own = {k: v for k, v in hparams.items() if not str(k).startswith("_")}  # Hydra's _target_ and such: no option
    if error := saved_data_error(own) or network_error(own):
        raise UserError(f"{key}={path} is damaged: {error}")
    try:  # the network its hyperparameters build must take its weights: built on the meta device (no memory used)
        with torch.device("meta"), warnings.catch_warnings():  # its warnings: each copy onto meta is a no-op
            warnings.simplefilter("ignore")  # (assign=True would make the checkpoint's tensors the meta module's)
            ImageModel.from_hparams(own).load_state_dict(checkpoint["state_dict"])  # strict: all of them
    except (TypeError, ValueError, RuntimeError) as err:  # hyperparameters that do not build these weights
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        reason = lines[1] if len(lines) > 1 else lines[0]  # torch: a heading, then e.g. "size mismatch for ..."
        raise UserError(f"{key}={path} is damaged: its hyperparameters do not match its weights ({reason})") from None
    return checkpoint


def check_same_network(hparams: dict, cfg: DictConfig, path: Path, key: str) -> None:
    """The checkpoint (`key`=`path`: ckpt_path or init_from) must hold the network that `cfg.model`
    builds: what gives its weights their meaning (architecture, sizes, levels, image size, classes).
    Dropout, the weight average's decay and the optim group may change; a resume continues the saved lr
    schedule's state, so it keeps the kind of schedule. `auto` classes stand for the saved count here; the
    data's count is compared with it once the data is read (`training.resolve_num_classes`)."""
    from pixelcnn.module import saved_optim  # late import: keeps config/CLI errors fast

    def network(values: dict) -> dict:
        # Class names and the data source come from the data (`training.data_hparams`), not the model config. An
        # option missing (a checkpoint or config from before it: grey before colour, the gated model's first head)
        # means its default, which is the design such a network was trained with.
        network_class = ARCHITECTURES.get(values.get("arch"), ImageModel)
        signatures = inspect.signature(ImageModel), inspect.signature(network_class)
        defaults = {name: list(p.default) if isinstance(p.default, tuple) else p.default for signature in signatures
                    for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
        return {k: v for k, v in {**defaults, **values}.items() if not k.startswith("_") and k not in (
            "dropout", "class_names", "data", "net", *TRAINING_KEYS)}

    saved, wanted = network(hparams), network(OmegaConf.to_container(cfg.model, resolve=True))
    if wanted.get("num_classes") == "auto" and saved.get("num_classes"):  # the data's count: checked once it is read
        wanted["num_classes"] = saved["num_classes"]
    for name in sorted(set(saved) | set(wanted)):
        if saved.get(name, "<unset>") != wanted.get(name, "<unset>"):
            shown = f"data.{name}" if name in ("levels", "image_size") else f"model.{name}"  # the model's follow data's
            raise UserError(f"{key}={path} holds a network with {shown}={saved.get(name, '<unset>')!r}, this config "
                            f"has {wanted.get(name, '<unset>')!r}: its weights only fit the same network, so pass "
                            f"the saved value (a default may have changed since it was trained), or train a new "
                            f"network from scratch")
    schedule, now = saved_optim(hparams)["scheduler"]["name"], cfg.optim.scheduler.name
    if key == "ckpt_path" and schedule != now:
        raise UserError(f"{key}={path} was trained with optim/scheduler={schedule}, this config has {now}: a resume "
                        f"continues the saved schedule (its other values may change); to start a new schedule from "
                        f"these weights, start a new run with init_from={path}")


def read_same_network(path: str | Path, cfg: DictConfig, key: str, prefer: str) -> tuple[Path, dict]:
    """The file and dict of the checkpoint a resume (`key`=ckpt_path) continues or a new run starts from
    (init_from): `resolve_checkpoint`, `read_checkpoint`, and it must hold `cfg`'s network (`check_same_network`)."""
    path = resolve_checkpoint(path, prefer, key)
    checkpoint = read_checkpoint(path, key)
    if key == "ckpt_path" and not {"optimizer_states", "loops"} <= set(checkpoint):  # e.g. weights/quick_gated.ckpt
        raise UserError(f"{key}={path} holds weights only (no optimizer or loop state to continue): start a new run "
                        f"from them with {as_override('init_from', path)}")
    check_same_network(checkpoint["hyper_parameters"], cfg, path, key)
    return path, checkpoint


# A checkpoint's `data`: the keys of `ImageDataModule.source_settings` (a test keeps the two the same), and
# `splits`, the fingerprints of the data it trained on (`data.fingerprint`; not in checkpoints saved before them).
SAVED_DATA_KEYS = ("source", "path", "channels", "val_size", "test_size", "split_seed", "splits")


def saved_data_error(hparams: dict) -> str | None:
    """What is wrong with the data settings a checkpoint holds (its levels, image size and `data`, which
    sample.py and evaluate.py read data with): values from a file, checked by the config's own rules."""
    data = hparams.get("data") or {}  # None: trained before other data sets, so on Fashion-MNIST
    if not isinstance(data, dict) or not set(data) <= set(SAVED_DATA_KEYS):
        return f"its data settings are not a mapping of {', '.join(SAVED_DATA_KEYS)}"
    values = {**{key: hparams[key] for key in ("levels", "image_size") if key in hparams}, **data}
    for key, value in values.items():
        ok, allowed = DATA.get(f"data.{key}", (lambda v: v is None or isinstance(v, str), "a path"))  # data.path
        if key == "splits":
            ok, allowed = lambda v: isinstance(v, dict) and all(isinstance(f, str) for f in v.values()), "fingerprints"
        if not ok(value):
            return f"its data.{key}={value!r} is invalid: it must be {allowed}"
    return None


def load_module(path: Path, map_location: str | torch.device = "cpu") -> ImageModel:
    """The model of a checkpoint file (`resolve_checkpoint` finds a run dir's), in eval mode: its network,
    likelihood and sampler, without the training (nor Lightning: sample.py and evaluate.py start fast)."""
    checkpoint = read_checkpoint(path)  # which checks that its hyperparameters build its weights' network
    if error := network_error(checkpoint["hyper_parameters"]):  # _keys_ too: they are all the network's arguments here
        raise UserError(f"ckpt={path} is damaged: {error}")
    module = ImageModel.from_hparams(checkpoint["hyper_parameters"])  # optim keys left out
    module.load_state_dict(checkpoint["state_dict"])
    return module.to(map_location).eval()
