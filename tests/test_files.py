"""Files in and out (`pytest -m faults`): a full disk (a real 2 MB tmpfs) as the run dir, the data
dir or `out=` is one `error:` line and leaves nothing half-written; sizes in a file (a gzip bomb, a
huge PNG) and a model too big for the device are refused before the work; every image mode reads
as the grey levels it shows."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tracemalloc
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import write_dataset
from pixelcnn.ops import sources
from pixelcnn.ops.checkpoints import read_checkpoint
from pixelcnn.commands.evaluate import load_images
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.datafiles import CorruptDatasetError, read_idx
from pixelcnn.ops.files import atomic_write, write_bytes
from pixelcnn.ops.images import load_image
from pixelcnn.ops.resources import Footprint, check_training_fits
from test_cli import data_args
from commands import run_here
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
    args = [a.format(work=work) for a in args]
    if script == "evaluate.py":  # the data the run trained on (other data adds a warning line that it changed)
        args.append(f"data_root={work / 'data'}")
    line = one_error_line(run_here(script, f"ckpt={small_run}", f"out={disk / 'out'}", *args, cwd=work))
    assert "No space left on device" in line and str(disk / "out") in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # nothing written, not even the out folder


@pytest.mark.parametrize("failure", ["error", "full disk"])
def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path, failure: str, request):
    """`atomic_write`: a second write that fails midway (an error raised in the block, or a real full disk)
    leaves the first contents whole and no other file beside them."""
    folder = request.getfixturevalue("disk") if failure == "full disk" else tmp_path
    path = write_bytes(folder / "result.bin", b"first contents")
    if failure == "error":
        with pytest.raises(RuntimeError, match="midway"), atomic_write(path) as file:
            file.write(b"half of the sec")
            raise RuntimeError("midway")
    else:
        with pytest.raises(OSError, match="No space left"):
            write_bytes(path, b"\1" * (3 * 2**20))  # more than the 2 MB disk holds
    assert path.read_bytes() == b"first contents"
    assert sorted(p.name for p in folder.iterdir()) == ["result.bin"]


# --- resource bombs are refused before the work ------------------------------------------------------
def gzip_stream(header: bytes, zeros: int) -> bytes:
    """A gzip file of `header` and then `zeros` zero bytes, compressed a chunk at a time."""
    compressor, chunk = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(2**20)
    parts = [compressor.compress(header)]
    parts += [compressor.compress(chunk) for _ in range(zeros // len(chunk))]
    return b"".join(parts) + compressor.flush()


def test_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path):
    """A header promising 10 images, then 256 MB of zeros (a 250 kB file): refused having inflated one byte
    more than the promise; a header promising more than MAX_DATA_BYTES is refused from the header alone."""
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip_stream(struct.pack(">HBB3I", 0, 8, 3, 10, 28, 28), 256 * 2**20))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptDatasetError, match="too long"):
            read_idx(bomb, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak
    huge = tmp_path / "huge.gz"
    huge.write_bytes(gzip_stream(struct.pack(">HBB3I", 0, 8, 3, 2**20, 2**10, 2**10), 0))
    with pytest.raises(CorruptDatasetError, match="more than the"):
        read_idx(huge, 3)


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The start of a .npy file of uint8 `shape`: what np.load allocates from."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return header.getvalue()


def test_array_files_are_bounded_by_their_headers(tmp_path: Path):
    """A 1 kB .npy whose header claims 10^15 bytes (np.load: a 909 TiB _ArrayMemoryError), a .npz member whose
    header claims more than the member holds, and a truncated .npy: one line each, nothing allocated, for
    data=array and for evaluate.py's images=."""
    cases = {"claims.npy": (npy_header((10**9, 1000, 1000)) + bytes(1000), "more than the 1073741824 a data file"),
             "truncated.npy": (npy_header((100, 16, 16)) + bytes(1000), r"25600 bytes of data, but only 1000 follow")}
    with zipfile.ZipFile(tmp_path / "member.npz", "w") as archive:
        archive.writestr("images.npy", npy_header((2**20, 2**10, 2**10)) + bytes(1000))
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=f"images={tmp_path / name} is not a readable .npy file .*{message}"):
            load_images(tmp_path / name, 8, 4)
    for name, message in [*((name, message) for name, (_, message) in cases.items()),
                          ("member.npz", r"images.npy: its header claims uint8 \(1048576, 1024, 1024\)")]:
        with pytest.raises(UserError, match=f"data.path={tmp_path / name} is not a readable NumPy file .*{message}"):
            sources.read_array(tmp_path / name, 1)


def test_zip_bomb_is_refused_without_inflating_it(tmp_path: Path, monkeypatch):
    """A .npz of 64 MB of zeros in 64 kB, with the limit lowered to 1 MB (a 1 GB bomb, scaled down): refused
    from its members' declared sizes, having inflated nothing (np.load: 7 GB of memory for a 1 MB file)."""
    monkeypatch.setattr(sources, "MAX_DATA_BYTES", 2**20)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("images.npy", "w") as member:
        member.write(npy_header((64, 1024, 1024)))
        for _ in range(64):
            member.write(bytes(2**20))
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"its members inflate to 67108992 bytes, more than the 1048576"):
            sources.read_array(bomb, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
    # Under the limit too: 64 MB from 64 kB inflates ~1000x, which no image array does.
    monkeypatch.setattr(sources, "MAX_DATA_BYTES", 2**30)
    with pytest.raises(UserError, match=r"images.npy inflates \d+ bytes to 67108992, more than 100x: a zip bomb"):
        sources.read_array(bomb, 1)


@pytest.mark.parametrize("args, message", [
    (["model.filters=100000"], "parameters"),  # 182 billion parameters: 2.9 TB before any activation
    (["model.residual_blocks=1000", "data.batch_size=4990"], "activations"),  # 3.3 TB of activations
])
def test_model_too_big_for_the_device_is_refused_before_it_is_built(work: Path, tmp_path: Path, args: list[str],
                                                                      message: str):
    data = [f"data.root={work / 'eval_data'}", f"data.system_dir={tmp_path / 'none'}"]
    line = error_line(run_here("train.py", *TINY, *data, *args, cwd=tmp_path))
    assert "needs at least" in line and message in line and "free" in line
    assert list(tmp_path.iterdir()) == []  # no run dir left


def test_an_epoch_that_cannot_end_in_a_day_is_refused():
    """At peak speed, a lower bound: 1e18 FLOP per step of 128 images cannot run 55,000 images a day."""
    slow = Footprint(parameters=10, state_bytes=160, activation_bytes=4, step_flops=1e18)
    with pytest.raises(UserError, match=r"one epoch of this model \(55,000 images\) takes at least \d+ h"):
        check_training_fits(slow, torch.device("cpu"), 55_000, 128, "model.residual_blocks")
    check_training_fits(replace(slow, step_flops=6e10), torch.device("cpu"), 55_000, 128, "model.residual_blocks")
    # Any accelerator, not CUDA alone (MPS, which Lightning picks on a Mac), is bounded by a GPU's peak.
    gpu_sized = replace(slow, step_flops=1e17)  # 6 h at a GPU's peak, days at any CPU's
    with pytest.raises(UserError, match=r"one epoch of this model"):
        check_training_fits(gpu_sized, torch.device("cpu"), 55_000, 128, "model.residual_blocks")
    check_training_fits(gpu_sized, torch.device("mps"), 55_000, 128, "model.residual_blocks")


def test_a_system_that_does_not_say_its_free_memory_refuses_no_model(monkeypatch):
    """macOS has neither /proc/meminfo nor SC_AVPHYS_PAGES: the memory check is skipped there (every
    run failed with an unforeseen ValueError), and the time check still holds."""
    from pixelcnn.ops import resources

    real_open = open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_meminfo)
    real_sysconf = os.sysconf

    def mac_sysconf(name):  # as macOS's: no SC_AVPHYS_PAGES
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return real_sysconf(name)

    monkeypatch.setattr(resources.os, "sysconf", mac_sysconf)
    monkeypatch.setattr(resources.os, "sysconf_names", {"SC_PAGE_SIZE": 30})
    assert resources.available_memory(torch.device("cpu")) is None
    huge = Footprint(parameters=10**12, state_bytes=16 * 10**12, activation_bytes=10**12, step_flops=6e10)
    check_training_fits(huge, torch.device("cpu"), 55_000, 128, "model.residual_blocks")
    with pytest.raises(UserError, match=r"one epoch of this model \(55,000 images\) takes at least"):
        check_training_fits(replace(huge, step_flops=1e18), torch.device("cpu"), 55_000, 128, "model.residual_blocks")
    monkeypatch.undo()
    assert resources.available_memory(torch.device("cpu")) > 0  # Linux: MemAvailable


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height grey pixels (no pixel data: only the header may be read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8000, 20000])  # over this project's limit; over Pillow's bomb limit too
def test_huge_image_is_refused_from_its_header(tmp_path: Path, side: int):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(UserError, match="pixels"):
        load_image(path)


def test_huge_png_in_evaluate_is_one_line(small_run: Path, tmp_path: Path):
    (tmp_path / "huge.png").write_bytes(png_header(20000, 20000))
    line = one_error_line(run_here("evaluate.py", f"ckpt={small_run}", f"images={tmp_path / 'huge.png'}",
                                   f"out={tmp_path / 'out'}", cwd=tmp_path))
    assert "huge.png" in line and "pixels" in line and not (tmp_path / "out").exists()


# --- every image mode reads as what it shows ---------------------------------------------------------
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2


def luma(r: float, g: float, b: float) -> float:
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


def palette_image(mode: str) -> Image.Image:
    image = Image.new(mode, (2, 1))
    image.putpalette([0, 0, 0, 10, 20, 200] + [0] * 762)
    image.putpixel((0, 0), (1, 128) if mode == "PA" else 1)
    return image


# mode -> (image, file format or None when no format stores the mode, expected grey of pixel (0, 0),
# expected RGB of pixel (0, 0)). Alpha is composited on white: v * a / 255 + 255 - a.
MODES = {
    "1": (lambda: Image.new("1", (2, 1), 1), "png", 255, (255, 255, 255)),
    "L": (lambda: Image.new("L", (2, 1), 77), "png", 77, (77, 77, 77)),
    "LA": (lambda: Image.new("LA", (2, 1), (200, 128)), "png", 227, (227, 227, 227)),
    "La": (lambda: Image.new("La", (2, 1), (100, 128)), None, 227, (227, 227, 227)),  # premultiplied
    "P": (lambda: palette_image("P"), "png", luma(10, 20, 200), (10, 20, 200)),
    "PA": (lambda: palette_image("PA"), "tiff", luma(132, 137, 227), (132, 137, 227)),
    "I;16": (lambda: Image.new("I;16", (2, 1), 3000), "png", 12, (12, 12, 12)),  # near black, not white
    "I;16B": (lambda: Image.new("I;16B", (2, 1), 65535), "tiff", 255, (255, 255, 255)),
    "I": (lambda: Image.new("I", (2, 1), 40000), "tiff", 156, (156, 156, 156)),
    "RGB": (lambda: Image.new("RGB", (2, 1), (200, 100, 50)), "png", luma(200, 100, 50), (200, 100, 50)),
    "RGBA": (lambda: Image.new("RGBA", (2, 1), (200, 100, 50, 128)), "png", luma(227, 177, 152), (227, 177, 152)),
    "RGBa": (lambda: Image.new("RGBa", (2, 1), (100, 50, 25, 128)), None, luma(227, 177, 152), (227, 177, 152)),
    "RGBX": (lambda: Image.new("RGBX", (2, 1), (200, 100, 50, 0)), None, luma(200, 100, 50), (200, 100, 50)),
    "CMYK": (lambda: Image.new("CMYK", (2, 1), (0, 0, 0, 255)), "tiff", 0, (0, 0, 0)),
    "YCbCr": (lambda: Image.new("YCbCr", (2, 1), (128, 128, 128)), "tiff", 128, (128, 128, 128)),
    "LAB": (lambda: Image.new("LAB", (2, 1), (255, 128, 128)), "tiff", 255, (255, 255, 255)),
    "HSV": (lambda: Image.new("HSV", (2, 1), (0, 0, 128)), None, 128, (128, 128, 128)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_reads_as_what_it_shows(mode: str, tmp_path: Path, monkeypatch):
    make, fmt, grey, rgb = MODES[mode]
    image = make()
    path = tmp_path / f"image.{fmt or 'none'}"
    if fmt is None:  # no file format stores this mode: Pillow hands it over as opened
        monkeypatch.setattr(Image, "open", lambda _: image)
    else:
        image.save(path)
        assert Image.open(path).mode == ("I;16" if mode == "I;16B" and fmt == "png" else mode)
    grey_pixels, rgb_pixels = load_image(path, channels=1), load_image(path, channels=3)
    assert grey_pixels.shape == (1, 2) and grey_pixels.dtype == np.uint8
    assert rgb_pixels.shape == (1, 2, 3) and rgb_pixels.dtype == np.uint8
    assert abs(int(grey_pixels[0, 0]) - grey) <= 1, (grey_pixels, grey)
    assert np.abs(rgb_pixels[0, 0].astype(int) - rgb).max() <= 1, (rgb_pixels, rgb)


def test_transparent_colour_of_a_file_is_composited(tmp_path: Path):
    image = Image.new("L", (2, 1), 77)
    image.putpixel((1, 0), 200)
    image.save(tmp_path / "t.png", transparency=77)  # a tRNS chunk: grey 77 is transparent
    assert load_image(tmp_path / "t.png").tolist() == [[255, 200]]  # on white


@pytest.mark.parametrize("mode, value, message", [("F", 0.5, "float pixels"), ("I", 70000, "outside 16 bits")])
def test_modes_without_a_known_range_are_refused(tmp_path: Path, mode: str, value: float, message: str):
    Image.new(mode, (2, 1), value).save(tmp_path / "x.tiff")
    with pytest.raises(UserError, match=message):
        load_image(tmp_path / "x.tiff")


def test_16_bit_png_scores_as_its_8_bit_twin(tmp_path: Path):
    """evaluate.py images=: a near-black 16-bit PNG is the near-black 8-bit one, not a white image."""
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 10  # 0..2550 of 65535: all below 8-bit 10
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray(((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)).save(tmp_path / "flat.png")
    images, names = load_images(tmp_path, image_size=16, levels=4)
    assert names == ["deep.png", "flat.png"] and torch.equal(images[0], images[1]) and images.max() == 0


@pytest.mark.parametrize("mode, suffix", [("I;16", "png"), ("I;16B", "tiff"), ("I", "tiff")])
def test_every_16_bit_value_reads_as_its_rounded_8_bit_value(tmp_path: Path, mode: str, suffix: str):
    """All 65536 values of a 16-bit image, exactly: v / 257 rounded (65535 is 255, 128 is 0, 129 is 1)."""
    values = np.arange(2**16, dtype=np.int64).reshape(256, 256)
    image = Image.new(mode, (256, 256))
    image.putdata(values.ravel().tolist())
    image.save(tmp_path / f"ramp.{suffix}")
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)  # no value lies halfway (v / 257 is never k + 1/2)
    assert np.array_equal(load_image(tmp_path / f"ramp.{suffix}"), expected)
    assert np.array_equal(load_image(tmp_path / f"ramp.{suffix}", channels=3), np.repeat(expected[..., None], 3, -1))


@pytest.mark.parametrize("orientation, shown", [
    (1, lambda a: a), (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
    (2, lambda a: a[:, ::-1]), (5, lambda a: a.T),
])
def test_exif_orientation_reads_as_the_image_shows(tmp_path: Path, orientation: int, shown):
    """A camera's stored pixels with an EXIF orientation tag (6: shown turned 90 degrees clockwise) read as the
    image that viewers show, in grey and in colour."""
    stored = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40  # 2 rows, 3 columns, all different
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path = tmp_path / "photo.png"  # an eXIf chunk; lossless, unlike a JPEG
    Image.fromarray(stored).save(path, exif=exif)
    assert np.array_equal(load_image(path), shown(stored))
    assert np.array_equal(load_image(path, channels=3), np.repeat(shown(stored)[..., None], 3, -1))


def test_run_dir_on_a_full_disk_is_refused_before_hydra_writes(work: Path, disk: Path):
    """Hydra's own record of the run could not be written: refused before it tries, in one line."""
    fill(disk, leave=0)
    line = one_error_line(run_here("train.py", *TINY, *data_args(work), f"hydra.run.dir={disk / 'run'}", cwd=work))
    assert "kB free" in line and str(disk / "run") in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
