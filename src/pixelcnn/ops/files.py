"""Every file a command writes is whole or absent: it is written to a temporary file in the same
folder and renamed onto its name only once complete (`atomic_write`), so a full disk, a kill or
an error midway leaves the old file (or none), never half of one. Lightning writes checkpoints
through `callbacks.AtomicCheckpointIO` (a `CheckpointIO` plugin) for the same reason: its own
`TorchCheckpointIO` writes through fsspec, whose local transaction stages the file in the
system's temp dir and copies it over, which a full disk cuts short. This module imports no
Lightning: sample.py and evaluate.py write through it and start fast."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import torch


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` (a hidden `.<name>.<random>.tmp`) for writing; when the
    block ends without error it is flushed to disk and renamed onto `path` (atomic on POSIX), else
    removed and `path` is left as it was. Creates the missing parent folders."""
    path = Path(path)
    new_dirs = missing_dirs(path.parent)
    tmp_name = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: a new file, this block's alone; 0o666 less the umask, as a plain open() makes it (mkstemp: 0600).
        with os.fdopen(os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the data is on disk (or its error raised here) before the name points at it
        os.replace(tmp_name, path)
    except BaseException as err:
        with suppress(OSError):  # none if it was never created
            os.remove(tmp_name)
        remove_if_empty(new_dirs)  # the folders made for it
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # a write names no file
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def missing_dirs(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first: what creating it would make."""
    return [d for d in (folder, *folder.parents) if not d.exists()]


def remove_if_empty(dirs: list[Path]) -> None:
    """Remove those of `dirs` (deepest first: `missing_dirs` made them for something that failed) that are empty."""
    for directory in dirs:
        with suppress(OSError):
            directory.rmdir()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path) as file:
        file.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as JSON (a run's or a failed sweep job's metrics.json, evaluate.py's, bench.json), each
    non-finite number as null: json.dumps would write NaN or Infinity, which is not JSON."""
    finite = json.loads(json.dumps(data), parse_constant=lambda constant: None)  # NaN, ±Infinity at any depth
    return write_bytes(path, json.dumps(finite, indent=2, allow_nan=False).encode())


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` into `path`, whole or not at all. Serialized in memory first: torch's own file
    writer reports a full disk as a RuntimeError without the errno, Python's write as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getbuffer())
