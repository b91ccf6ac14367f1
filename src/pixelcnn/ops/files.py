"""Every file a command writes is whole or absent: it is written to a temporary file in the same
folder and renamed onto its name only once complete (`atomic_write`), so a full disk, a kill or
an error midway leaves the old file (or none), never half of one. Lightning writes checkpoints
through `callbacks.AtomicCheckpointIO` (a `CheckpointIO` plugin) for the same reason: its own
`TorchCheckpointIO` writes through fsspec, whose local transaction stages the file in the
system's temp dir and copies it over, which a full disk cuts short. This module imports no
Lightning: sample.py and evaluate.py write through it and start fast."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import torch

# Read once at import, while nothing else runs: os.umask can only be read by setting it.
UMASK = os.umask(0o022)
os.umask(UMASK)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` (a hidden `.<name>.<random>.tmp`) for writing; when the
    block ends without error it is flushed to disk and renamed onto `path` (atomic on POSIX), else
    removed and `path` is left as it was. Creates the missing parent folders."""
    path = Path(path)
    new_dirs = missing_dirs(path.parent)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # the data is on disk (or its error raised here) before the name points at it
        os.chmod(tmp_name, 0o666 & ~UMASK)  # mkstemp makes it 0600; a plain open() honours the umask
        os.replace(tmp_name, path)
    except BaseException as err:
        if tmp_name is not None:
            with suppress(OSError):
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


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` into `path`, whole or not at all. Serialized in memory first: torch's own file
    writer reports a full disk as a RuntimeError without the errno, Python's write as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getbuffer())
