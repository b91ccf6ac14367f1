"""The sample-quality classifier: Fréchet distance by hand, training and its cache, quality metrics."""

from __future__ import annotations

import math
import pytest
import torch

import pixelcnn.classifier as classifier_module
from pixelcnn.checkpoints import load_module
from pixelcnn.classifier import (
    FashionClassifier,
    classifier_path,
    fit_and_cache,
    frechet_distance,
    load_or_train_classifier,
    quality_metrics,
)
from test_data import write_dataset
from test_evaluate import SIZE, save_checkpoint

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


def test_training_runs_and_the_cache_is_reused(tmp_path, monkeypatch, capsys):
    write_dataset(tmp_path, n_train=5010, n_test=20)  # random pictures: accuracy is chance, but it must run
    trained = fit_and_cache(tmp_path, SIZE, 4, epochs=1)
    assert classifier_path(tmp_path, SIZE, 4).is_file() and 0 <= trained.test_accuracy <= 1
    assert "test accuracy" in capsys.readouterr().out

    monkeypatch.setattr(classifier_module, "fit_and_cache", lambda *a, **k: pytest.fail("retrained despite cache"))
    loaded = load_or_train_classifier(tmp_path, SIZE, 4)
    assert loaded.test_accuracy == pytest.approx(trained.test_accuracy) and not loaded.training
    images = torch.randint(4, (5, 1, SIZE, SIZE))
    assert torch.allclose(loaded(images), trained(images))

    # Another size is another cache file; a broken cache file is retrained.
    assert classifier_path(tmp_path, 16, 4) != classifier_path(tmp_path, SIZE, 4)
    classifier_path(tmp_path, SIZE, 4).write_bytes(b"broken")
    monkeypatch.setattr(classifier_module, "fit_and_cache", lambda *a, **k: "retrained")
    assert load_or_train_classifier(tmp_path, SIZE, 4) == "retrained"


@pytest.mark.parametrize("num_classes", [0, 10])
def test_quality_metrics_keys(tmp_path, num_classes):
    module = load_module(save_checkpoint(tmp_path / "tiny.ckpt", num_classes))
    test_set = torch.randint(4, (30, 1, SIZE, SIZE), dtype=torch.uint8), torch.arange(30) % 10
    torch.manual_seed(0)
    metrics = quality_metrics(module, test_set, n=20, classifier=FashionClassifier(SIZE, 4).eval())
    assert set(metrics) == {"frechet_distance"} | ({"class_accuracy"} if num_classes else set())
    assert metrics["frechet_distance"] > 0 and all(isinstance(v, float) for v in metrics.values())
    if num_classes:
        assert 0 <= metrics["class_accuracy"] <= 1

