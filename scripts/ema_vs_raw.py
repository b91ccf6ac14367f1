"""Test bits/dim of a run's weight average (`model.ema_decay`) against its raw weights, at the same step.

    python scripts/ema_vs_raw.py RUN_DIR_OR_CKPT [...] [--prefer best|last] [--data-root DIR]

A checkpoint of a run with `model.ema_decay > 0` holds the average as its `state_dict` (what
sample.py and evaluate.py use) and the raw weights under `current_model_state`: the two scored on
the same test split is a paired comparison of the lever, free of seed noise.
"""

from __future__ import annotations

import argparse

import torch

from pixelcnn.checkpoints import load_module, read_checkpoint, resolve_checkpoint
from pixelcnn.commands.cli import checkpoint_data
from pixelcnn.config import UserError
from pixelcnn.image_model import ImageModel


def split_bits_per_dim(model: ImageModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    maps = model.nll_maps(images, labels if model.conditional else None)  # (N, H, W)
    return maps.double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run dirs or .ckpt files of runs trained with model.ema_decay > 0")
    parser.add_argument("--prefer", default="best", choices=("best", "last"), help="which checkpoint of a run dir")
    parser.add_argument("--data-root", help="the data dir, as evaluate.py's data_root (default: $PIXELCNN_DATA_DIR, "
                                            "else ~/.cache/pixelcnn)")
    args = parser.parse_args()
    try:
        for run in args.runs:
            compare(resolve_checkpoint(run, prefer=args.prefer), args.data_root)
    except UserError as err:  # one line, as the commands give
        raise SystemExit(f"error: {err}") from None


def compare(path, data_root: str | None) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = read_checkpoint(path)
    if "current_model_state" not in checkpoint:
        raise UserError(f"{path} holds no raw weights (current_model_state): not trained with model.ema_decay > 0")
    model = load_module(path, device)  # the average (state_dict), checked as for sample.py
    datamodule = checkpoint_data(model, data_root)  # its test split, as evaluate.py reads it
    images, labels = datamodule.test_set
    scores = {"average": split_bits_per_dim(model, images.to(device), labels.to(device))}
    try:
        model.load_state_dict(checkpoint["current_model_state"])
    except RuntimeError:
        raise UserError(f"{path} is damaged: its raw weights (current_model_state) do not fit its network") from None
    scores["raw"] = split_bits_per_dim(model, images.to(device), labels.to(device))
    decay = checkpoint["hyper_parameters"].get("ema_decay")
    print(f"{path} (step {checkpoint.get('global_step')}, ema_decay {decay}): test bits/dim average "
          f"{scores['average']:.4f}, raw {scores['raw']:.4f}, average - raw {scores['average'] - scores['raw']:+.4f}")


if __name__ == "__main__":
    main()
