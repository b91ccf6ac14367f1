"""Tests of the Fashion-MNIST data pipeline: preprocessing, IDX validation, sources, cache, batching."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

from fakes import IDX_NAMES, write_dataset, write_idx
from pixelcnn import data
from pixelcnn.data import BatchLoader, ImageDataModule, preprocess, quantize, resize_images
from pixelcnn.ops.datafiles import CorruptDatasetError, DatasetNotFoundError, default_data_dir, read_idx

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def make_module(root: Path, **kwargs) -> ImageDataModule:
    kwargs = {"system_dir": root / "no-system-dir", "download": False, "val_size": 30, **kwargs}
    return ImageDataModule(root=root, **kwargs)


def source_indices(images: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """For each image, the index of the one candidate equal to it (random 16x16 images never collide)."""
    equal = (images[:, None] == candidates[None]).flatten(2).all(-1)  # (N, M)
    assert (equal.sum(1) == 1).all()
    return equal.int().argmax(1)


# ---------------------------------------------------------------------------- the data dir


def test_data_dir_is_one_place_whatever_the_launch_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative default would land here
    monkeypatch.setenv("PIXELCNN_DATA_DIR", "~/datasets/pixelcnn")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / "datasets" / "pixelcnn"
    monkeypatch.delenv("PIXELCNN_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "pixelcnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == tmp_path / "home" / ".cache" / "pixelcnn"
    assert ImageDataModule().root == default_data_dir()  # data.root: null
    assert ImageDataModule(root="~/mine").root == tmp_path / "home" / "mine"


# ---------------------------------------------------------------------------- preprocessing


def test_resize_4x4_to_2x2_by_hand():
    # Half-pixel centres: output pixel i samples source coordinate (i + 0.5) * 2 - 0.5 = 0.5 or 2.5,
    # i.e. exactly halfway between two source pixels, so each output is the mean of a 2x2 block.
    image = torch.tensor([[0, 64, 128, 192], [0, 64, 128, 192], [255, 255, 0, 0], [255, 255, 0, 0]], dtype=torch.uint8)
    assert resize_images(image[None], 2).tolist() == [[[[32.0, 160.0], [255.0, 0.0]]]]
    assert quantize(image[None], 2, 4).tolist() == [[[[0, 2], [3, 0]]]]


def test_preprocess_in_bounded_batches_keeps_order_and_values(monkeypatch):
    """preprocess quantizes 2**24 values at a time (the float copies of a 1 GB array would take ~7 GB): images of
    two sizes, interleaved, three of them more than one batch, come out in order as quantize makes them."""
    rng = np.random.default_rng(0)
    big, small = rng.integers(0, 256, (3, 2400, 2400), dtype=np.uint8), rng.integers(0, 256, (2, 9, 9), dtype=np.uint8)
    expected = torch.cat([quantize(torch.from_numpy(np.stack(group)), 16, 4) for group in (big, small)])
    batches = []
    monkeypatch.setattr(data, "quantize", lambda images, *args: batches.append(images.numel()) or quantize(images, *args))
    assert torch.equal(preprocess([big[0], small[0], big[1], big[2], small[1]], 16, 4, 1), expected[[0, 3, 1, 2, 4]])
    assert max(batches) <= 2**24 and sum(batches) == big.size + small.size


def test_resize_ramp_4_to_3_by_hand():
    # Scale 4/3: centres map to 0.5 * 4/3 - 0.5 = 1/6, 1.5, 2.5 * 4/3 - 0.5 = 17/6 on the ramp 0, 30, 60, 90.
    image = torch.tensor([0, 30, 60, 90], dtype=torch.uint8).expand(4, 4)
    resized = resize_images(image[None], 3)
    assert torch.allclose(resized, torch.tensor([5.0, 45.0, 85.0]).expand(1, 1, 3, 3), atol=1e-4)


def test_resize_28_to_16_matches_half_pixel_formula():
    images = torch.randint(256, (3, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    # TF-style bilinear weights written out: source = (i + 0.5) * 28/16 - 0.5, clamped at the edges.
    weights = np.zeros((16, 28))
    for i in range(16):
        source = max((i + 0.5) * 28 / 16 - 0.5, 0.0)
        low = int(np.floor(source))
        weights[i, low] += 1 - (source - low)
        weights[i, min(low + 1, 27)] += source - low
    expected = weights @ images.double().numpy() @ weights.T
    assert np.allclose(resize_images(images, 16)[:, 0].numpy(), expected, atol=1e-3)


@pytest.mark.parametrize(
    ("levels", "value", "level"),
    [(4, 0, 0), (4, 63, 0), (4, 64, 1), (4, 127, 1), (4, 128, 2), (4, 191, 2), (4, 192, 3), (4, 255, 3),
     (3, 85, 0), (3, 86, 1), (3, 170, 1), (3, 171, 2), (3, 255, 2), (2, 127, 0), (2, 128, 1), (256, 200, 200)],
)
@pytest.mark.parametrize("image_size", [28, 16])
def test_quantize_constant_images_at_level_boundaries(levels, value, level, image_size):
    images = torch.full((2, 28, 28), value, dtype=torch.uint8)
    levels_out = quantize(images, image_size, levels)
    assert levels_out.dtype == torch.uint8 and levels_out.shape == (2, 1, image_size, image_size)
    assert (levels_out == level).all()


# ---------------------------------------------------------------------------- data module on small IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_datamodule_splits_small_files(tmp_path, gz):
    written = write_dataset(tmp_path, gz=gz)
    dm = make_module(tmp_path)
    dm.setup()
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = dm.train_set, dm.val_set, dm.test_set
    assert (len(train_x), len(val_x), len(test_x)) == (70, 30, 20)
    for images, labels in (dm.train_set, dm.val_set, dm.test_set):
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 16, 16) and images.max() < 4
        assert labels.dtype == torch.int64 and labels.shape == (len(images),)

    # Every training image keeps its own label, and train + val partition the training file.
    expected = quantize(written["train-images-idx3-ubyte"], 16, 4)
    train_idx, val_idx = source_indices(train_x, expected), source_indices(val_x, expected)
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(100))
    assert torch.equal(train_y, written["train-labels-idx1-ubyte"][train_idx].long())
    assert torch.equal(val_y, written["train-labels-idx1-ubyte"][val_idx].long())
    assert torch.equal(test_x, quantize(written["t10k-images-idx3-ubyte"], 16, 4))
    assert torch.equal(test_y, written["t10k-labels-idx1-ubyte"].long())


def test_split_is_fixed_by_split_seed_not_global_seed(tmp_path):
    write_dataset(tmp_path)

    def val_labels(split_seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        dm = make_module(tmp_path, split_seed=split_seed)
        dm.setup()
        return dm.val_set[0]

    assert torch.equal(val_labels(0, 1), val_labels(0, 2))
    assert not torch.equal(val_labels(0, 1), val_labels(1, 1))


def test_cache_is_written_and_reused(tmp_path):
    write_dataset(tmp_path, gz=True)
    first = make_module(tmp_path)
    first.setup()
    assert (tmp_path / "fashion_mnist_16px_4lv.pt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []

    for name in IDX_NAMES:  # the cache alone must be enough now
        (tmp_path / f"{name}.gz").unlink()
    again = make_module(tmp_path)
    again.setup()
    assert torch.equal(again.train_set[0], first.train_set[0]) and torch.equal(again.test_set[1], first.test_set[1])

    # Another size or level count is a different cache, so it needs the files again.
    with pytest.raises(DatasetNotFoundError):
        make_module(tmp_path, image_size=8, levels=8).setup()


def test_corrupt_cache_is_rebuilt(tmp_path):
    write_dataset(tmp_path)
    cache = tmp_path / "fashion_mnist_8px_8lv.pt"
    cache.write_bytes(b"not a torch file")
    dm = make_module(tmp_path, image_size=8, levels=8)
    dm.setup()
    assert dm.train_set[0].shape[1:] == (1, 8, 8) and dm.train_set[0].max() < 8
    assert torch.load(cache, weights_only=True)["test_images"].shape == (20, 1, 8, 8)


@pytest.mark.parametrize("stale", ["level out of range", "wrong size", "wrong label dtype"])
def test_readable_but_inconsistent_cache_is_rebuilt(tmp_path, stale):
    write_dataset(tmp_path)
    make_module(tmp_path, image_size=8, levels=4).setup()
    cache = tmp_path / "fashion_mnist_8px_4lv.pt"
    good = torch.load(cache, weights_only=True)
    bad = dict(good)
    if stale == "level out of range":
        bad["train_images"] = good["train_images"].clone().fill_(7)
    elif stale == "wrong size":
        bad["test_images"] = torch.zeros(20, 1, 4, 4, dtype=torch.uint8)
    else:
        bad["test_labels"] = good["test_labels"].to(torch.uint8)
    torch.save(bad, cache)
    dm = make_module(tmp_path, image_size=8, levels=4)
    dm.setup()
    assert torch.equal(dm.data["train_images"], good["train_images"]) and dm.data["test_images"].shape == (20, 1, 8, 8)


def test_failed_cache_write_leaves_nothing_behind(tmp_path, monkeypatch):
    write_dataset(tmp_path)

    def interrupted_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", interrupted_save)
    dm = make_module(tmp_path)
    dm.setup()
    assert len(dm.train_set[0]) == 70
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(IDX_NAMES)


def test_falls_back_to_system_dir_and_skips_cache_when_root_unusable(tmp_path):
    write_dataset(tmp_path / "system")
    (tmp_path / "a-file").write_text("")
    dm = make_module(tmp_path / "a-file" / "root", system_dir=tmp_path / "system")  # root can never be created
    dm.setup()
    assert len(dm.test_set[0]) == 20


def test_finds_files_in_torchvision_raw_folder(tmp_path):
    write_dataset(tmp_path / "FashionMNIST" / "raw", gz=True)
    dm = make_module(tmp_path)
    dm.setup()
    assert len(dm.train_set[0]) == 70


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    def fake_download(dataset):
        write_dataset(Path(dataset.raw_folder))

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    dm = make_module(tmp_path, download=True)
    dm.setup()
    assert len(dm.test_set[0]) == 20


# ---------------------------------------------------------------------------- bad files


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def extend(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def wrong_type(path: Path) -> None:  # type code 0x0C (int32) instead of 0x08 (unsigned byte)
    data = path.read_bytes()
    path.write_bytes(bytes([0, 0, 0x0C, data[3]]) + data[4:])


def wrong_ndim(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(bytes([0, 0, 0x08, data[3] + 1]) + data[4:])


def drop_label(path: Path) -> None:
    write_idx(path, torch.zeros(99, dtype=torch.uint8))


def label_ten(path: Path) -> None:  # Fashion-MNIST has classes 0..9
    write_idx(path, torch.full((20,), 10, dtype=torch.uint8))


def break_gzip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 :] = b"\xff" * (len(data) - len(data) // 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "damage", "problem"),
    [
        ("train-images-idx3-ubyte", truncate, "truncated"),
        ("train-images-idx3-ubyte", extend, "too long"),
        ("train-images-idx3-ubyte", wrong_type, "magic"),
        ("t10k-labels-idx1-ubyte", wrong_ndim, "magic"),
        ("train-labels-idx1-ubyte", drop_label, "100 images but"),
        ("t10k-labels-idx1-ubyte", label_ten, "label 10 is not a Fashion-MNIST class"),
        ("t10k-images-idx3-ubyte.gz", break_gzip, "gzip"),
        ("train-labels-idx1-ubyte.gz", truncate, "gzip"),
    ],
)
def test_corrupt_file_raises_naming_it(tmp_path, name, damage, problem):
    write_dataset(tmp_path, gz=name.endswith(".gz"))
    damage(tmp_path / name)
    with pytest.raises(CorruptDatasetError, match=problem) as error:
        make_module(tmp_path).setup()
    assert str(tmp_path / name) in str(error.value)
    assert "reinstall" in str(error.value)


def test_a_corrupt_mnist_file_is_named_as_mnist(tmp_path):
    """The message names the file's dataset, and only Fashion-MNIST's suggests reinstalling its Debian package."""
    write_dataset(tmp_path / "MNIST" / "raw")
    truncate(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
    with pytest.raises(CorruptDatasetError, match="Corrupt MNIST file .*t10k-images-idx3-ubyte: truncated") as error:
        make_module(tmp_path, source="mnist").setup()
    assert "Fashion" not in str(error.value) and "reinstall" not in str(error.value)


def test_read_idx_rejects_empty_file(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CorruptDatasetError, match="header"):
        read_idx(tmp_path / "empty", 3)


# ---------------------------------------------------------------------------- not found


def assert_names_all_sources(message: str, root: Path, system_dir: Path) -> None:
    assert str(root.resolve()) in message
    assert str(system_dir) in message and "apt-get install dataset-fashion-mnist" in message
    assert "data.root=" in message


def test_not_found_with_download_disabled(tmp_path):
    system_dir = tmp_path / "empty-system"
    system_dir.mkdir()
    with pytest.raises(DatasetNotFoundError) as error:
        make_module(tmp_path / "root", system_dir=system_dir, download=False).setup()
    assert_names_all_sources(str(error.value), tmp_path / "root", system_dir)
    assert "download disabled" in str(error.value)


def test_not_found_when_download_fails(tmp_path, monkeypatch):
    def offline(dataset):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    with pytest.raises(DatasetNotFoundError) as error:
        make_module(tmp_path / "root", download=True).setup()
    assert_names_all_sources(str(error.value), tmp_path / "root", tmp_path / "root" / "no-system-dir")
    assert "download into" in str(error.value) and "no network" in str(error.value)


# ---------------------------------------------------------------------------- batching


def epoch_labels(loader: BatchLoader) -> torch.Tensor:
    return torch.cat([labels for _, labels in loader])


def test_batch_loader_covers_every_item_once_in_a_new_order_each_epoch():
    loader = BatchLoader(torch.zeros(103, 1, 2, 2, dtype=torch.uint8), torch.arange(103), 10, shuffle=True, seed=0)
    assert len(loader) == 11 and [len(y) for _, y in loader] == [10] * 10 + [3]
    first, second = epoch_labels(loader), epoch_labels(loader)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(103))
    assert not torch.equal(first, second)


def test_batch_loader_order_is_reproducible():
    def order(seed: int | None) -> torch.Tensor:
        return epoch_labels(BatchLoader(torch.zeros(50, 1, 2, 2), torch.arange(50), 7, shuffle=True, seed=seed))

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    torch.manual_seed(5)
    from_global = order(None)
    torch.manual_seed(5)
    assert torch.equal(from_global, order(None))


def test_batch_loader_without_shuffle_keeps_order():
    loader = BatchLoader(torch.zeros(25, 1, 2, 2), torch.arange(25), 10)
    assert torch.equal(epoch_labels(loader), torch.arange(25))


def test_hflip_flips_some_items_horizontally_only():
    images = torch.randint(256, (200, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    loader = BatchLoader(images, torch.arange(200), 64, shuffle=True, hflip=True, seed=0)
    flipped = []
    for batch, index in loader:
        same = (batch == images[index]).flatten(1).all(1)
        mirrored = (batch == images[index].flip(-1)).flatten(1).all(1)
        assert (same | mirrored).all()
        flipped.append(mirrored & ~same)
    fraction = torch.cat(flipped).float().mean()
    assert 0.3 < fraction < 0.7


def test_dataloaders(tmp_path):
    write_dataset(tmp_path)
    dm = make_module(tmp_path, batch_size=16, eval_batch_size=25, hflip=True, shuffle_seed=0)
    dm.setup()
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert (len(train), len(val), len(test)) == (5, 2, 1)
    images, labels = next(iter(train))
    assert images.shape == (16, 1, 16, 16) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    # Evaluation is neither shuffled nor flipped.
    assert torch.equal(torch.cat([x for x, _ in val]), dm.val_set[0])
    assert torch.equal(torch.cat([x for x, _ in test]), dm.test_set[0])
    assert dm.train_set[0].device.type == "cpu"  # no trainer attached: stays on the CPU


def fake_trainer(device: str) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_rank=0, world_size=1,
                           overfit_batches=0)


def test_on_device_stays_on_cpu_for_cpu_trainer(tmp_path):
    write_dataset(tmp_path)
    dm = make_module(tmp_path)
    dm.trainer = fake_trainer("cpu")
    dm.setup()
    assert next(iter(dm.train_dataloader()))[0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("on_device", ["auto", True, False])
def test_on_device_moves_data_to_cuda_once(tmp_path, on_device):
    write_dataset(tmp_path)
    dm = make_module(tmp_path, on_device=on_device, hflip=True)
    dm.trainer = fake_trainer("cuda:0")
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    expected = "cuda" if on_device else "cpu"
    assert images.device.type == labels.device.type == dm.train_set[0].device.type == expected


# ---------------------------------------------------------------------------- the real dataset


@pytest.mark.dataset
@pytest.mark.skipif(
    not all((SYSTEM_DIR / f"{name}.gz").is_file() for name in IDX_NAMES),
    reason=f"Fashion-MNIST not installed in {SYSTEM_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(tmp_path):
    dm = ImageDataModule(root=tmp_path, system_dir=SYSTEM_DIR, download=False)
    dm.setup()
    assert [len(s[0]) for s in (dm.train_set, dm.val_set, dm.test_set)] == [55000, 5000, 10000]
    test_images, test_labels = dm.test_set
    assert test_images.shape == (10000, 1, 16, 16) and 0 <= test_images.min() and test_images.max() == 3
    assert torch.bincount(test_labels).tolist() == [1000] * 10
    # Mean level of the 16x16 / 4-level test set, measured once: 2265523 / 2560000 = 0.88497.
    assert 0.8845 < test_images.float().mean().item() < 0.8855
    assert (tmp_path / "fashion_mnist_16px_4lv.pt").is_file()
