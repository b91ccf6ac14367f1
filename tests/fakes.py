"""Small IDX files written by the tests themselves, so the real loader code path runs without the real dataset."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path: Path, array: torch.Tensor) -> None:
    """An unsigned-byte IDX file, gzipped when the name ends in .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    raw = header + array.numpy().tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_dataset(directory: Path, gz: bool = False, n_train: int = 100, n_test: int = 20) -> dict[str, torch.Tensor]:
    """Small random Fashion-MNIST-shaped IDX files; returns what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(256, (n_train, 28, 28), generator=gen, dtype=torch.uint8),
        "train-labels-idx1-ubyte": torch.randint(10, (n_train,), generator=gen, dtype=torch.uint8),
        "t10k-images-idx3-ubyte": torch.randint(256, (n_test, 28, 28), generator=gen, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.randint(10, (n_test,), generator=gen, dtype=torch.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / (f"{name}.gz" if gz else name), array)
    return arrays
