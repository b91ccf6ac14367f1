"""What `train_classifier.py` does: (re)train the sample-quality classifier (`pixelcnn.quality`)
and overwrite its cache file."""

from __future__ import annotations

import inspect

from omegaconf import DictConfig, OmegaConf

from pixelcnn.quality import FashionClassifier, classify, fit_and_cache, frechet_distance, random_subset
from pixelcnn.ops.resources import pick_device
from pixelcnn.ops.rules import check_options, validate
from pixelcnn.data import ImageDataModule, setup_datamodule


def main(cfg: DictConfig) -> FashionClassifier:
    """Train on the training split of the data module `cfg.data` describes, print test accuracy
    and the Fréchet floor (1000 train vs 1000 test images), and overwrite the cache."""
    validate(cfg, "classifier")
    device = pick_device(cfg.device)
    data_args = OmegaConf.to_container(cfg.data, resolve=True)
    check_options(data_args, inspect.signature(ImageDataModule).parameters, "data", "the data module")
    datamodule = setup_datamodule(**data_args)
    classifier = fit_and_cache(datamodule, device, cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    n = min(1000, len(datamodule.train_set[0]), len(datamodule.test_set[0]))
    train_feats = classify(classifier, random_subset(datamodule.train_set, n, cfg.seed))[0]
    test_feats = classify(classifier, random_subset(datamodule.test_set, n, cfg.seed))[0]
    print(f"[classifier] Fréchet distance floor ({n} train vs {n} test images): "
          f"{frechet_distance(train_feats, test_feats):.3f}", flush=True)
    return classifier
