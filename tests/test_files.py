"""Files in and out (`pytest -m faults`): a full disk (a real 2 MB tmpfs) as the run dir, the data
dir or `out=` is one `error:` line and leaves nothing half-written; sizes in a file (a gzip bomb, a
huge PNG) and a model too big for the device are refused before the work; every image mode reads
as the grey levels it shows."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fakes import write_dataset
from pixelcnn.checkpoints import read_checkpoint
from test_cli import data_args
from test_faults import one_error_line, run

pytestmark = pytest.mark.faults

TINY = ["data.batch_size=16", "data.eval_batch_size=20", "data.val_size=20", "data.download=false",
        "sample.every_n_epochs=0", "trainer.enable_progress_bar=false", "quality_n=0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("files")
    write_dataset(path / "data", n_train=100, n_test=20)
    write_dataset(path / "eval_data", n_train=5010, n_test=20)  # evaluate.py holds out data.val_size=5000 of them
    return path


@pytest.fixture(scope="module")
def small_run(work: Path) -> Path:
    run_dir = work / "small"
    result = run("train.py", *TINY, "model.filters=8", "model.residual_blocks=1", "trainer.max_epochs=1",
                 *data_args(work), f"hydra.run.dir={run_dir}", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def disk(tmp_path: Path):
    """A real 2 MB tmpfs, unmounted after the test whatever its outcome."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a command that failed mid-run (Lightning's own status lines may precede it)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr[-3000:]
    return lines[-1]


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes with a file of ours."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
    return filler


def leftovers(folder: Path) -> list[str]:
    """Half-written files: temporaries and empty files."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and (".tmp" in p.name or p.stat().st_size == 0)
            and p.name != "train.log"]


def test_full_run_dir_keeps_the_last_complete_checkpoint_and_resumes(work: Path, disk: Path):
    """Checkpoints of ~770 kB: epoch 1's best and last fit the 2 MB, epoch 2's best does not."""
    run_dir = disk / "run"
    args = [*TINY, "model.filters=80", "model.residual_blocks=2", "trainer.max_epochs=3", *data_args(work)]
    line = error_line(run("train.py", *args, f"hydra.run.dir={run_dir}", cwd=work))
    assert "No space left on device" in line and f"ckpt_path={run_dir}" in line
    assert leftovers(disk) == []
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[0].startswith("best-epoch000") and checkpoints[1] == "last.ckpt"
    for name in checkpoints:
        read_checkpoint(run_dir / "checkpoints" / name)  # each one whole
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space freed
    resumed = run("train.py", f"ckpt_path={run_dir}", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "metrics.json").is_file() and leftovers(disk) == []


def test_full_run_dir_before_the_first_checkpoint_leaves_no_run_dir(work: Path, disk: Path):
    """The seed model's first checkpoint (3.7 MB) does not fit: the run dir it created holds nothing to keep."""
    args = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=1", *data_args(work)]
    line = error_line(run("train.py", *args, f"hydra.run.dir={disk / 'run'}", cwd=work))
    assert "No space left on device" in line and "ckpt_path" not in line
    assert list(disk.iterdir()) == []


def test_full_data_dir_costs_only_the_cache(work: Path, disk: Path, tmp_path: Path):
    """The preprocessed cache cannot be written: a warning, no temporary file, and the run goes on."""
    shutil.copytree(work / "data", disk / "data", ignore=shutil.ignore_patterns("*.pt"))  # IDX files, no cache
    fill(disk, leave=4096)
    args = [*TINY, "model.filters=8", "model.residual_blocks=1", "trainer.max_epochs=1",
            f"data.root={disk / 'data'}", f"data.system_dir={tmp_path / 'none'}"]
    result = run("train.py", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Not caching" in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (disk / "data").iterdir()) == sorted(p.name for p in (work / "data").iterdir()
                                                                       if p.suffix != ".pt")
    assert leftovers(disk) == []


@pytest.mark.parametrize("script, args", [
    ("sample.py", ["n=64", "scale=16"]),
    ("evaluate.py", ["quality=false", "scale=16"]),
    ("evaluate.py", ["images={work}/imgs"]),
])
def test_full_out_dir_is_one_line_and_leaves_nothing(work: Path, small_run: Path, disk: Path, script: str,
                                                     args: list[str]):
    images = work / "imgs"
    if not images.exists():
        from PIL import Image
        images.mkdir()
        for i in range(3):
            Image.new("L", (16, 16), 40 * i).save(images / f"{i}.png")
    fill(disk, leave=1024)
    args = [a.format(work=work) for a in args] + ([f"data_root={work / 'eval_data'}"] if script == "evaluate.py" else [])
    line = one_error_line(run(script, f"ckpt={small_run}", f"out={disk / 'out'}", *args, cwd=work))
    assert "No space left on device" in line and str(disk / "out") in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # nothing written, not even the out folder
