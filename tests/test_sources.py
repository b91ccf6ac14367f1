"""Your own images: image folders, arrays and MNIST go through Fashion-MNIST's preprocessing, are
cached by content, carry their classes to the model, and real colour icons train end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from commands import run, run_here
from fakes import write_dataset
from pixelcnn.ops.errors import UserError
from pixelcnn.data import ImageDataModule, changed_splits, quantize, setup_datamodule
from pixelcnn.ops.datafiles import DatasetNotFoundError
from pixelcnn.ops.images import levels_to_grid
from pixelcnn.module import ImageModule
from pixelcnn.ops.sources import has_classes
from pixelcnn.training import data_hparams, resolve_num_classes

ICONS = Path("/usr/share/icons/oxygen/base/16x16")


def module_for(tmp_path: Path, source: str, path: Path, **kwargs) -> ImageDataModule:
    kwargs = {"val_size": 2, "test_size": 2, **kwargs}
    dm = ImageDataModule(source=source, path=path, root=tmp_path / "data", **kwargs)
    dm.setup()
    return dm


def random_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_folder_classes_modes_sizes_and_alpha(tmp_path):
    """Sub-folders are classes (sorted), every mode becomes RGB, sizes may differ, alpha goes on white."""
    folder = tmp_path / "pictures"
    written = {}  # name -> the RGB array it should read as
    for k, (cls, mode, size) in enumerate([("cat", "RGB", (12, 12)), ("cat", "L", (20, 16)), ("ant", "RGBA", (12, 12)),
                                           ("ant", "P", (12, 12)), ("bee", "RGB", (7, 9)), ("bee", "RGB", (12, 12))]):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        rgb = random_image((size[1], size[0], 3), k)
        if mode == "L":
            rgb = np.repeat(rgb[..., :1], 3, axis=-1)
        image = Image.fromarray(rgb if mode != "L" else rgb[..., 0])
        if mode == "RGBA":  # half transparent: composited on white
            alpha = np.full(rgb.shape[:2], 128, dtype=np.uint8)
            image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
            rgb = ((rgb.astype(np.uint32) * 128 + 255 * 127 + 127) // 255).astype(np.uint8)
        if mode == "P":
            image = image.quantize(16)
            rgb = np.asarray(image.convert("RGB"))
        name = f"{cls}/{k}.{'png' if k % 2 or mode in ('RGBA', 'P') else 'bmp'}"
        image.save(folder / name)
        written[name] = rgb
    (folder / "notes.txt").write_text("not an image")
    dm = module_for(tmp_path, "folder", folder, channels=3, image_size=8, levels=4, val_size=1, test_size=1)
    assert dm.class_names == ["ant", "bee", "cat"] and dm.num_classes == 3
    images = torch.cat([dm.train_set[0], dm.val_set[0], dm.test_set[0]])
    labels = torch.cat([dm.train_set[1], dm.val_set[1], dm.test_set[1]])
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.uint8
    for name, rgb in written.items():
        expected = quantize(torch.from_numpy(rgb)[None], 8, 4)  # (1, 3, 8, 8): the one preprocessing path
        match = (images == expected).flatten(1).all(1)
        assert match.sum() == 1, name
        assert labels[match].item() == dm.class_names.index(name.split("/")[0])


def test_folder_split_folders_and_grey(tmp_path):
    folder = tmp_path / "digits"
    for split, count in (("train", 5), ("test", 3)):
        for k in range(count):
            (folder / split / str(k % 2)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_image((10, 10, 3), k + 10 * count)).save(folder / split / str(k % 2) / f"{k}.png")
    dm = module_for(tmp_path, "folder", folder, image_size=10, levels=256, val_size=1)
    assert (len(dm.train_set[0]), len(dm.val_set[0]), len(dm.test_set[0])) == (4, 1, 3)  # test/ is the test split
    assert dm.train_set[0].shape[1] == 1 and dm.class_names == ["0", "1"]
    grey = np.asarray(Image.open(folder / "test" / "0" / "0.png").convert("L"))  # PIL's luma = ours
    assert torch.equal(dm.test_set[0][0, 0], torch.from_numpy(grey))


def test_edited_folder_is_read_again(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for k in range(6):
        Image.fromarray(random_image((8, 8), k)).save(folder / f"{k}.png")
    first = module_for(tmp_path, "folder", folder, image_size=8)
    assert first.num_classes == 0 and len(first.train_set[0]) == 2  # unlabelled; 6 - 2 val - 2 test
    caches = list((tmp_path / "data").glob("folder-flat-*_8px_4lv_1ch.pt"))
    assert len(caches) == 1
    assert torch.equal(module_for(tmp_path, "folder", folder, image_size=8).train_set[0], first.train_set[0])
    Image.fromarray(random_image((8, 8), 99)).save(folder / "6.png")  # edited: a new cache, 7 images
    again = module_for(tmp_path, "folder", folder, image_size=8)
    assert len(again.train_set[0]) == 3 and len(list((tmp_path / "data").glob("folder-flat-*.pt"))) == 2


def test_every_source_records_what_each_split_holds(tmp_path):
    """Each split's fingerprint (count and content) for IDX, folder and array data, grey and colour: other
    content is another fingerprint, and what changed is named with its counts."""
    write_dataset(tmp_path / "idx", n_train=30, n_test=6)
    (tmp_path / "flat").mkdir()
    for k in range(6):
        Image.fromarray(random_image((8, 8), k)).save(tmp_path / "flat" / f"{k}.png")
    np.save(tmp_path / "colour.npy", random_image((10, 8, 8, 3), 0))
    modules = [setup_datamodule(tmp_path / "idx", 16, 4, system_dir=None, download=False, val_size=5, channels=channels)
               for channels in (1, 3)]
    modules += [module_for(tmp_path, "folder", tmp_path / "flat", image_size=8),
                module_for(tmp_path, "array", tmp_path / "colour.npy", channels=3, image_size=8)]
    for dm in modules:
        sets = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}
        assert [fp.split()[:2] for fp in dm.fingerprints.values()] == [[str(len(s[0])), "images,"] for s in sets.values()]
        assert changed_splits(dm.fingerprints, dm.fingerprints) is None and changed_splits(None, dm.fingerprints) is None
    grey, colour = modules[0].fingerprints, modules[1].fingerprints
    assert grey != colour and changed_splits(grey, colour) == (
        "train 25 other images, val 5 other images, test 6 other images")
    assert changed_splits({**grey, "test": "7 images, sha256 0"}, grey) == "test 7 -> 6 images"


@pytest.mark.parametrize("problem, message", [
    ("empty", "holds no image files"), ("truncated", "is not a readable PNG image"),
    ("loose", "is not in a class folder"),
])
def test_bad_folders_are_one_error(tmp_path, problem, message):
    folder = tmp_path / "bad"
    (folder / "a").mkdir(parents=True)
    if problem != "empty":
        Image.fromarray(random_image((8, 8), 0)).save(folder / "a" / "0.png")
    if problem == "truncated":
        (folder / "a" / "1.png").write_bytes((folder / "a" / "0.png").read_bytes()[:30])
    if problem == "loose":
        Image.fromarray(random_image((8, 8), 1)).save(folder / "1.png")
    with pytest.raises(UserError, match=message):
        module_for(tmp_path, "folder", folder)
    assert not list((tmp_path / "data").glob("*.pt"))  # nothing cached


@pytest.mark.parametrize("layout, message", [
    ({"train/a": 2, "train/b": 2, "val/a": 1, "val/c": 1, "test/d": 1}, r"val/ has classes that train/ has not \(c\)"),
    ({"train/a": 2, "train/b": 2, "test/a": 1, "test/d": 1}, r"test/ has classes that train/ has not \(d\)"),
    ({"a": 3, "b": 0}, r"class folder \S*bad/b holds no image files"),
    ({"train/a": 3, "train/b": 3, "test/a": 1, "test/b": 0}, r"class folder \S*test/b holds no image files"),
    ({"train/a": 3, "train/b": 3, "val": 0}, r"holds no image files .* under \S*bad/val$"),
])
def test_folders_whose_classes_are_not_the_training_ones_are_one_error(tmp_path, layout, message):
    """A class in val/ or test/ that train/ has not (a class no model learns), an empty class folder (as
    torchvision's ImageFolder refuses it) and an empty split folder are each one line, not a class more or less."""
    folder = tmp_path / "bad"
    for k, (where, count) in enumerate(layout.items()):
        (folder / where).mkdir(parents=True)
        for n in range(count):
            Image.fromarray(random_image((8, 8), 10 * k + n)).save(folder / where / f"{n}.png")
    with pytest.raises(UserError, match=message):
        module_for(tmp_path, "folder", folder, val_size=1, test_size=1)
    assert not list((tmp_path / "data").glob("*.pt"))  # nothing cached


IMAGES, LABELS = np.zeros((8, 6, 6), np.uint8), np.arange(8) % 3


@pytest.mark.parametrize("arrays, message", [
    # labels for every split or for none: else a split's images all become class 0
    ({"train_images": IMAGES, "train_labels": LABELS, "test_images": IMAGES}, "has train_labels but no test_labels"),
    ({"train_images": IMAGES, "val_images": IMAGES, "val_labels": LABELS}, "has val_labels but no train_labels"),
    ({"images": IMAGES, "class_names": np.array(["a"])}, "has class_names but no labels"),
    ({"train_images": IMAGES, "test_image": IMAGES}, r"holds \['test_image', 'train_images'\]: expected"),
    ({"images": IMAGES, "labels": LABELS, "val_labels": LABELS}, r"holds \['images', 'labels', 'val_labels'\]"),
    # no images, or images of no pixels
    ({"images": np.zeros((0, 16, 16), np.uint8)}, r"images has shape \(0, 16, 16\): it holds no images$"),
    ({"images": np.zeros((60, 0, 16), np.uint8)}, r"images has shape \(60, 0, 16\): its images have no pixels"),
    ({"train_images": IMAGES, "test_images": np.zeros((0, 6, 6, 3), np.uint8)}, "test_images has shape"),
    # labels: integers of a sane class count
    ({"images": IMAGES, "labels": LABELS * 0 + 2**40}, r"of 1099511627776\.\.1099511627776: expected integers 0\.\.65535"),
    ({"images": IMAGES, "labels": LABELS - 1}, r"of -1\.\.1: expected integers 0\.\.65535"),
    ({"images": IMAGES, "labels": LABELS.astype(np.float32)}, "labels is float32 .8,.: expected integers"),
    ({"images": IMAGES, "labels": LABELS > 0}, "labels is bool .8,.: expected integers"),
    # class names: one distinct string per class
    ({"images": IMAGES, "labels": LABELS, "class_names": np.array(["a", "b", "a"])}, "with 'a' twice: expected one"),
    ({"images": IMAGES, "labels": LABELS, "class_names": np.array([["a", "b"], ["c", "d"]])}, r"<U1 \(2, 2\): expected"),
    ({"images": IMAGES, "labels": LABELS, "class_names": np.arange(3)}, r"class_names is int64 \(3,\): expected"),
    ({"images": IMAGES, "labels": LABELS, "class_names": np.array(["a", "b"])}, r"the labels go up to 2\)$"),
])
def test_bad_arrays_are_one_error(tmp_path, arrays, message):
    """Each thing wrong in an array file is one line (a .npy when it holds images only, as a user saves one)."""
    path = tmp_path / ("bad.npy" if list(arrays) == ["images"] else "bad.npz")
    np.save(path, arrays["images"]) if path.suffix == ".npy" else np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        module_for(tmp_path, "array", path, val_size=1, test_size=1)
    assert not list((tmp_path / "data").glob("*.pt"))  # nothing cached


def test_array_sources(tmp_path):
    images = random_image((10, 12, 12, 4), 0)  # RGBA
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(10) % 3, class_names=np.array(["x", "y", "z"]))
    dm = module_for(tmp_path, "array", tmp_path / "a.npz", channels=3, image_size=12, levels=256)
    assert dm.class_names == ["x", "y", "z"]
    everything = torch.cat([dm.train_set[0], dm.val_set[0], dm.test_set[0]])
    on_white = (images[..., :3].astype(np.uint32) * images[..., 3:] + 255 * (255 - images[..., 3:].astype(np.uint32)) + 127) // 255
    assert sorted(map(bytes, everything.permute(0, 2, 3, 1).numpy())) == sorted(map(bytes, on_white.astype(np.uint8)))

    np.save(tmp_path / "grey.npy", random_image((9, 6, 6), 1))  # no labels, grey, as RGB
    dm = module_for(tmp_path, "array", tmp_path / "grey.npy", channels=3, image_size=6, levels=4)
    assert dm.num_classes == 0 and dm.train_set[0].shape == (5, 3, 6, 6)
    assert torch.equal(dm.train_set[0][:, 0], dm.train_set[0][:, 2])

    np.save(tmp_path / "floats.npy", np.zeros((4, 6, 6), dtype=np.float32))
    with pytest.raises(UserError, match="expected uint8"):
        module_for(tmp_path, "array", tmp_path / "floats.npy")
    np.savez(tmp_path / "pickled.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="not a readable NumPy file"):
        module_for(tmp_path, "array", tmp_path / "pickled.npz")


def test_mnist_offline_from_the_data_dir(tmp_path):
    data = tmp_path / "data"
    written = write_dataset(data / "MNIST" / "raw", n_train=40, n_test=10)
    write_dataset(data, n_train=30, n_test=10)  # Fashion-MNIST's files in the root are not MNIST's
    dm = setup_datamodule(data, 16, 2, source="mnist", download=False, system_dir=None, val_size=5)
    assert torch.equal(dm.test_set[0], quantize(written["t10k-images-idx3-ubyte"], 16, 2))  # binarized: 2 levels
    assert dm.class_names == [str(k) for k in range(10)] and (data / "mnist_16px_2lv.pt").is_file()
    with pytest.raises(DatasetNotFoundError, match="^MNIST not found"):
        setup_datamodule(tmp_path / "empty", 16, 2, source="mnist", download=False, system_dir=None)


def test_fashion_mnist_as_png_folders_is_the_same_data(tmp_path):
    """Fashion-MNIST written as PNG class folders reads back bit-identical, with the same bits/dim."""
    written = write_dataset(tmp_path / "idx", n_train=60, n_test=20)
    folder = tmp_path / "png"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = written[f"{prefix}-images-idx3-ubyte"], written[f"{prefix}-labels-idx1-ubyte"]
        for k, (image, label) in enumerate(zip(images, labels)):
            (folder / split / str(int(label))).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.numpy()).save(folder / split / str(int(label)) / f"{k:05d}.png")
    fashion = setup_datamodule(tmp_path / "idx", 16, 4, system_dir=None, download=False, val_size=10)
    own = setup_datamodule(tmp_path / "cache", 16, 4, source="folder", path=folder, val_size=10)
    for split in ("train", "test"):  # the folder is in (class, index) order
        order = torch.from_numpy(np.lexsort((np.arange(len(fashion.data[f"{split}_labels"])),
                                             fashion.data[f"{split}_labels"].numpy())))
        assert torch.equal(own.data[f"{split}_images"], fashion.data[f"{split}_images"][order])
        assert torch.equal(own.data[f"{split}_labels"], fashion.data[f"{split}_labels"][order])
    module = ImageModule(levels=4, image_size=16, filters=8, residual_blocks=1)
    bpd = [module.image_bits_per_dim(*dm.test_set).mean().item() for dm in (fashion, own)]
    assert bpd[0] == pytest.approx(bpd[1], abs=1e-9)


def test_num_classes_must_be_the_datas(tmp_path):
    np.savez(tmp_path / "a.npz", images=random_image((8, 6, 6), 0), labels=np.arange(8) % 4)
    dm = module_for(tmp_path, "array", tmp_path / "a.npz", image_size=6)
    assert data_hparams(4, dm)["class_names"] == ["0", "1", "2", "3"]
    assert data_hparams(0, dm)["class_names"] is None
    with pytest.raises(UserError, match=r"model.num_classes=10 but the data \(array\) has 4 classes .*use model.num_classes=4 or 0"):
        resolve_num_classes(OmegaConf.create({"model": {"num_classes": 10}}), dm)  # the class count's one check


def test_num_classes_auto_is_the_datas(tmp_path):
    """model.num_classes=auto trains on the data's class count (saved in the checkpoint), resumes from its own
    saved config, and is one error line on unlabelled data."""
    np.savez(tmp_path / "a.npz", images=random_image((40, 6, 6), 0), labels=np.arange(40) % 4)
    np.save(tmp_path / "unlabelled.npy", random_image((40, 6, 6), 1))

    def train(*args: str, refused: bool = False) -> subprocess.CompletedProcess:
        return (run_here if refused else run)("train.py", *args, cwd=tmp_path)

    new_run = ["data=array", "data.image_size=6", "data.val_size=8", "data.test_size=8", "data.batch_size=8",
               f"data.root={tmp_path / 'data'}", "model.filters=8", "model.residual_blocks=1", "quality_n=0",
               "trainer.enable_progress_bar=false", "model.num_classes=auto", "trainer.max_epochs=1"]
    done = train(*new_run, f"data.path={tmp_path / 'a.npz'}", "hydra.run.dir=run")
    assert done.returncode == 0, done.stderr[-3000:]
    hparams = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == 4 and hparams["class_names"] == ["0", "1", "2", "3"]
    assert " parameters, 4 classes; " in done.stdout  # what auto became
    done = train("ckpt_path=run", "trainer.max_epochs=2")  # its saved config says auto
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2
    np.savez(tmp_path / "a.npz", images=random_image((40, 6, 6), 0), labels=np.arange(40) % 5)  # a class more
    done = train("ckpt_path=run", "trainer.max_epochs=3", refused=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} holds a network for 4 classes, but the data "
        "(array) has 5 (model.num_classes=auto): resume on the data it was trained on, or train a new network from "
        "scratch"], done.stderr

    done = train(*new_run, f"data.path={tmp_path / 'unlabelled.npy'}", "hydra.run.dir=run2", refused=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: model.num_classes=auto but the data (array) has no classes: use model.num_classes=0 (unconditional), "
        "or give the images classes (one sub-folder each, docs/data.md)"], done.stderr
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_colour_grid():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.long)
    images[0, 0] = 3  # red
    grid = levels_to_grid(images, 4, nrow=2, padding=0)
    assert grid.shape == (3, 4, 8) and grid[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and grid[:, 0, 4].tolist() == [0.0] * 3


@pytest.mark.skipif(not ICONS.is_dir(), reason=f"needs the oxygen-icon-theme package ({ICONS}): "
                                                "apt-get install oxygen-icon-theme (make data does)")
def test_colour_icons_end_to_end(tmp_path):
    """train.py on Debian's 16x16 colour icons (a few batches, tiny model), then sample.py (new images and
    completions) and evaluate.py."""

    def succeeds(script: str, *args: str) -> str:
        done = (run if script == "train.py" else run_here)(script, *args, cwd=tmp_path)  # sample, evaluate: no training
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    succeeds("train.py", "data=folder", f"data.path={ICONS}", "data.channels=3", "data.image_size=8", "model.num_classes=auto",
        f"data.root={tmp_path / 'data'}", "model.filters=8", "model.residual_blocks=1", "trainer.limit_train_batches=3",
        "trainer.max_epochs=1", "sample.n=2", "trainer.enable_progress_bar=false", "hydra.run.dir=run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["test_bpd"] < 8 and "frechet_distance" not in metrics  # Fashion-MNIST's classifier: skipped
    out = succeeds("sample.py", "ckpt=run", "n=2", "label=emotes", "out=samples")
    levels = np.load(next((tmp_path / "samples").glob("*_label-emotes.npy")))
    assert levels.shape == (2, 3, 8, 8) and levels.max() < 4 and "grid:" in out
    png = Image.open(next((tmp_path / "samples").glob("*_label-emotes.png")))
    assert png.mode == "RGB"
    succeeds("sample.py", "ckpt=run", "mode=complete", "n=2", "completions=1", "rows=4", f"data_root={tmp_path / 'data'}",
        "out=complete")  # the checkpoint's own test split: the icons
    assert np.load(next((tmp_path / "complete").glob("completions_*.npy"))).shape == (2, 1, 3, 8, 8)
    out = succeeds("evaluate.py", "ckpt=run", f"data_root={tmp_path / 'data'}", "heatmaps=2", "extremes=2", "out=eval")
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test_bpd"] == pytest.approx(metrics["test_bpd"], abs=1e-4) and "quality skipped" in out
    assert evaluated["test_images"] == 178  # 10% of the 1,775 icons


def test_evaluate_images_uses_the_training_reader(tmp_path):
    """evaluate.py images=<folder> reads any image files exactly as data=folder does (colour, alpha on white)."""
    from pixelcnn.commands.evaluate import load_images

    folder = tmp_path / "pictures"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(random_image((10, 10, 4), k), "RGBA").save(folder / f"{k}.png")
    images, names = load_images(folder, 8, 4, channels=3)
    dm = module_for(tmp_path, "folder", folder, channels=3, image_size=8, val_size=1, test_size=1)
    trained = torch.cat([dm.train_set[0], dm.val_set[0], dm.test_set[0]])
    assert names == ["0.png", "1.png", "2.png"] and images.shape == (3, 3, 8, 8)
    assert sorted(map(bytes, images.numpy())) == sorted(map(bytes, trained.numpy()))


def test_whether_data_has_classes_is_told_from_names_alone(tmp_path: Path, monkeypatch):
    """A sweep's pre-check (`has_classes`): class folders (in split folders too) and label arrays, no image read."""
    for folder in ("flat", "classes/a", "classes/b", "splits/train", "splits/test", "split_classes/train/a",
                   "split_classes/test/a"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / folder / "x.png")
    images = np.zeros((3, 4, 4), np.uint8)
    np.save(tmp_path / "images.npy", images)
    np.savez(tmp_path / "plain.npz", images=images)
    np.savez(tmp_path / "split.npz", train_images=images, test_images=images)
    np.savez(tmp_path / "labelled.npz", train_images=images, train_labels=np.zeros(3, np.int64))
    np.savez(tmp_path / "named.npz", images=images, class_names=np.array(["a"]))
    monkeypatch.setattr(Image, "open", None)  # no image is opened
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", None)  # no array is read
    assert [has_classes("folder", str(tmp_path / f)) for f in ("flat", "classes", "splits", "split_classes")] == [
        False, True, False, True]
    assert [has_classes("array", str(tmp_path / f)) for f in ("images.npy", "plain.npz", "split.npz", "labelled.npz",
                                                               "named.npz")] == [False, False, False, True, True]
    (tmp_path / "broken.npz").write_bytes(b"PK not a zip")
    assert has_classes("array", str(tmp_path / "broken.npz")) and has_classes("folder", str(tmp_path / "missing"))
    with open(tmp_path / "one_array.npz", "wb") as file:  # a .npy file named .npz: the job says what is wrong
        np.save(file, images)
    assert has_classes("array", str(tmp_path / "one_array.npz"))
    assert has_classes("fashion_mnist", None)  # the job reads anything this cannot tell
