"""Weights to start from: a run's checkpoint cut down to what sample.py and evaluate.py read.

    python scripts/export_weights.py <run dir or .ckpt> <new file.ckpt>

Keeps the network's hyperparameters and weights (with model.ema_decay > 0, the averaged ones: those a checkpoint
is evaluated with) and drops the optimizer, scheduler, loop and callback states, which only a resume needs: the
shipped weights/quick_gated.ckpt is `make weights`'s run exported so (about 0.4 MB instead of 1.3 MB). It never
overwrites a file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pixelcnn.ops.checkpoints import load_module, read_checkpoint, resolve_checkpoint
from pixelcnn.ops.errors import UserError


def export(source: str, target: Path) -> Path:
    path = resolve_checkpoint(source, prefer="best")
    checkpoint = read_checkpoint(path)
    weights = {"hyper_parameters": checkpoint["hyper_parameters"],
               "state_dict": {name: tensor.clone() for name, tensor in checkpoint["state_dict"].items()}}
    with open(target, "xb") as file:  # exclusive: an existing file is never overwritten
        torch.save(weights, file)
    load_module(target)  # what sample.py and evaluate.py will do with it: fails loudly if anything is missing
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run dir (its best checkpoint) or a .ckpt file")
    parser.add_argument("target", type=Path, help="the weights file to write (must not exist)")
    args = parser.parse_args()
    try:
        source = export(args.source, args.target)
    except FileExistsError:
        sys.exit(print(f"error: {args.target} exists: choose a new file name", file=sys.stderr) or 2)
    except UserError as err:
        sys.exit(print(f"error: {err}", file=sys.stderr) or 2)
    print(f"{args.target}: weights of {source}, {args.target.stat().st_size / 1e6:.2f} MB")
