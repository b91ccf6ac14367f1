"""The sample-quality classifier: Fréchet distance by hand, training and its cache, quality metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import pixelcnn.quality as classifier_module
from pixelcnn.ops.checkpoints import load_module
from pixelcnn.ops.datafiles import cache_path
from pixelcnn.quality import (
    FashionClassifier,
    classify,
    fit_and_cache,
    frechet_distance,
    load_or_train_classifier,
    quality_metrics,
)
from pixelcnn.commands.train_classifier import main as run
from pixelcnn.ops.errors import UserError
from pixelcnn.data import setup_datamodule
from test_data import write_dataset
from test_evaluate import SIZE, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny_datamodule(root: Path, **kwargs):
    """100 training images (80 after a 20-image val split) and 20 test images, set up."""
    write_dataset(root, n_train=100, n_test=20)
    return setup_datamodule(root, SIZE, 4, val_size=20, system_dir=root / "no-system-dataset", download=False,
                            **kwargs)


def gaussian_features(n: int, dim: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_frechet_distance_of_identical_sets_is_zero():
    feats = gaussian_features(300, 8)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_in_one_dimension_by_hand():
    # Means 0 and 3, unbiased variances 2 and 8: (m1 - m2)^2 + (s1 - s2)^2 = 9 + (sqrt 2 - sqrt 8)^2 = 11.
    a = torch.tensor([[-1.0], [1.0]])
    b = torch.tensor([[1.0], [5.0]])
    assert frechet_distance(a, b) == pytest.approx(9 + (math.sqrt(2) - math.sqrt(8)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(11.0)


def test_frechet_distance_is_symmetric_and_grows_with_shift():
    a, b = gaussian_features(400, 6, seed=1), gaussian_features(300, 6, seed=2) * 1.5
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    near, far = frechet_distance(a, a + 0.1), frechet_distance(a, a + 1.0)
    assert near == pytest.approx(6 * 0.1**2) and far == pytest.approx(6.0)  # a shift only moves the mean
    assert 0 < frechet_distance(a, gaussian_features(400, 6, seed=3)) < near + 0.5 < far


def test_a_classifier_that_cannot_be_cached_is_not_said_to_be_saved(tmp_path, capsys, caplog):
    """Where the cache file cannot be written, the run goes on with the trained classifier; no line says it was
    saved (one did: "...; saved <path>"), the warning says it was not."""
    datamodule = tiny_datamodule(tmp_path)
    cache_path(tmp_path, SIZE, 4, "classifier").mkdir()  # a folder where the file would go: the write fails
    trained = fit_and_cache(datamodule, epochs=1)
    out = capsys.readouterr().out
    assert 0 <= trained.test_accuracy <= 1 and "saved" not in out and "caching it at" in out
    assert "Not caching at" in caplog.text and cache_path(tmp_path, SIZE, 4, "classifier").is_dir()


def test_training_runs_and_the_cache_is_reused(tmp_path, monkeypatch, capsys):
    datamodule = tiny_datamodule(tmp_path)  # random pictures: accuracy is chance, but it must run
    trained = fit_and_cache(datamodule, epochs=1)
    assert cache_path(tmp_path, SIZE, 4, "classifier").is_file() and 0 <= trained.test_accuracy <= 1
    assert "test accuracy" in capsys.readouterr().out

    monkeypatch.setattr(classifier_module, "fit_and_cache", lambda *a, **k: pytest.fail("retrained despite cache"))
    loaded = load_or_train_classifier(datamodule)
    assert loaded.test_accuracy == pytest.approx(trained.test_accuracy) and not loaded.training
    images = torch.randint(4, (5, 1, SIZE, SIZE))
    assert torch.allclose(loaded(images), trained(images))

    # Another size is another cache file; a broken cache file is retrained.
    assert cache_path(tmp_path, 16, 4, "classifier") != cache_path(tmp_path, SIZE, 4, "classifier")
    cache_path(tmp_path, SIZE, 4, "classifier").write_bytes(b"broken")
    monkeypatch.setattr(classifier_module, "fit_and_cache", lambda *a, **k: "retrained")
    assert load_or_train_classifier(datamodule) == "retrained"


@pytest.mark.parametrize("num_classes", [0, 10])
def test_quality_metrics_keys(tmp_path, num_classes):
    module = load_module(save_checkpoint(tmp_path / "tiny.ckpt", num_classes))
    test_set = torch.randint(4, (30, 1, SIZE, SIZE), dtype=torch.uint8), torch.arange(30) % 10
    torch.manual_seed(0)
    classifier = FashionClassifier(4).eval()
    drawn = []  # (samples, labels) of each module.sample call
    original_sample = module.sample
    module.sample = lambda n, t, seed, labels, method: drawn.append((original_sample(n, t, seed, labels, method),
                                                                     labels)) or drawn[-1][0]
    metrics = quality_metrics(module, test_set, n=20, classifier=classifier)
    assert set(metrics) == {"frechet_distance", "quality_n"} | ({"class_accuracy"} if num_classes else set())
    assert metrics["frechet_distance"] > 0 and all(isinstance(v, float) for k, v in metrics.items() if k != "quality_n")
    assert metrics["quality_n"] == 20
    [(samples, labels)] = drawn
    if num_classes:  # classes 0..9 in turn, and the score is the share classified as their class
        assert torch.equal(labels, torch.arange(20) % 10)
        expected = (classify(classifier, samples)[1] == labels).float().mean().item()
        assert metrics["class_accuracy"] == pytest.approx(expected)
    else:
        assert labels is None



def test_quality_metrics_on_a_tiny_data_module_trains_caches_and_caps_n(tmp_path, monkeypatch, capsys):
    """As at the end of a training run: the run's own data module (val_size=20, 20 test images),
    no classifier given, more samples asked for than there are test images."""
    module = load_module(save_checkpoint(tmp_path / "tiny.ckpt", num_classes=10))
    datamodule = tiny_datamodule(tmp_path / "data")
    metrics = quality_metrics(module, datamodule, n=1000, seed=3)  # trains the classifier: 5 epochs of 1 batch
    out = capsys.readouterr().out
    assert "using 20" in out and "test accuracy" in out and "on 80 images" in out  # trained on its 80 train images
    assert cache_path(tmp_path / "data", SIZE, 4, "classifier").is_file()  # cached in the data module's root
    assert metrics["quality_n"] == 20
    assert set(metrics) == {"frechet_distance", "frechet_distance_floor", "class_accuracy", "quality_n"}
    assert metrics["frechet_distance"] > 0 and metrics["frechet_distance_floor"] > 0
    assert 0 <= metrics["class_accuracy"] <= 1

    # The second call reuses the cached classifier and gives the same numbers.
    monkeypatch.setattr(classifier_module, "fit_and_cache", lambda *a, **k: pytest.fail("retrained despite cache"))
    assert quality_metrics(module, datamodule, n=1000, seed=3) == metrics


def test_quality_metrics_rejects_a_data_module_of_another_size(tmp_path):
    module = load_module(save_checkpoint(tmp_path / "tiny.ckpt"))
    write_dataset(tmp_path / "data", n_train=100, n_test=20)
    other = setup_datamodule(tmp_path / "data", SIZE * 2, 4, val_size=20, download=False)
    with pytest.raises(ValueError, match="16px"):
        quality_metrics(module, other, n=10, classifier=FashionClassifier(4).eval())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quality_metrics_with_data_and_model_on_cuda(tmp_path):
    module = load_module(save_checkpoint(tmp_path / "tiny.ckpt", num_classes=10), "cuda")
    datamodule = tiny_datamodule(tmp_path / "data")
    datamodule.train_set = tuple(t.cuda() for t in datamodule.train_set)  # as `on_device` leaves them
    datamodule.test_set = tuple(t.cuda() for t in datamodule.test_set)
    fit_and_cache(datamodule, "cuda", epochs=1)
    metrics = quality_metrics(module, datamodule, n=1000)
    assert metrics["quality_n"] == 20 and metrics["frechet_distance"] > 0


def classifier_config(data_root: Path, **overrides):
    cfg = OmegaConf.load(ROOT / "conf/entry/classifier.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    data = {"root": str(data_root), "image_size": SIZE, "val_size": 20, "download": False}  # +data.val_size=20 ...
    return OmegaConf.merge(cfg, {"data": data, "epochs": 1, "device": "cpu", **overrides})


def test_train_classifier_command_uses_the_configured_data_module(tmp_path, capsys):
    write_dataset(tmp_path, n_train=100, n_test=20)
    classifier = run(classifier_config(tmp_path))
    out = capsys.readouterr().out
    assert cache_path(tmp_path, SIZE, 4, "classifier").is_file() and not classifier.training
    assert "on 80 images" in out and "Fréchet distance floor (20 train vs 20 test images)" in out


@pytest.mark.parametrize(("override", "message"), [({"epochs": 0}, "epochs="), ({"batch_size": 0}, "batch_size="),
                                                   ({"lr": -1.0}, "lr="), ({"lr": "fast"}, "lr=")])
def test_train_classifier_bad_options_are_user_errors(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        run(classifier_config(tmp_path / "no-data", **override))
