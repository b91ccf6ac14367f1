"""Test bits/dim of a run's weight average (`model.ema_decay`) against its raw weights, at the same step.

    python scripts/ema_vs_raw.py RUN_DIR_OR_CKPT [...] [--prefer best|last] [--data-root DIR]

A checkpoint of a run with `model.ema_decay > 0` holds the average as its `state_dict` (what
sample.py and evaluate.py use) and the raw weights under `current_model_state`: the two scored on
the same test split is a paired comparison of the lever, free of seed noise.
"""

from __future__ import annotations

import argparse

import torch

from pixelcnn.checkpoints import read_checkpoint, resolve_checkpoint
from pixelcnn.data import setup_datamodule
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for run in args.runs:
        path = resolve_checkpoint(run, prefer=args.prefer)
        checkpoint = read_checkpoint(path)
        if "current_model_state" not in checkpoint:
            raise SystemExit(f"error: {path} holds no raw weights (current_model_state): not trained with model.ema_decay > 0")
        model = ImageModel.from_hparams(checkpoint["hyper_parameters"]).to(device).eval()
        datamodule = setup_datamodule(args.data_root, model.image_size, model.levels, **(model.data or {}))
        images, labels = datamodule.test_set
        scores = {}
        for name, key in (("average", "state_dict"), ("raw", "current_model_state")):
            model.load_state_dict(checkpoint[key])
            scores[name] = split_bits_per_dim(model, images.to(device), labels.to(device))
        decay = checkpoint["hyper_parameters"].get("ema_decay")
        print(f"{path} (step {checkpoint.get('global_step')}, ema_decay {decay}): test bits/dim average "
              f"{scores['average']:.4f}, raw {scores['raw']:.4f}, average - raw {scores['average'] - scores['raw']:+.4f}")


if __name__ == "__main__":
    main()
