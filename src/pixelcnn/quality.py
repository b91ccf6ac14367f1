"""A small Fashion-MNIST classifier that scores generated images, and the Fréchet distance.

The classifier sees images exactly as the PixelCNN does (quantized to `levels` grey levels at
`image_size`, input `level / levels`), so its features measure what the generative model
models. It is trained on a data module's training split and cached beside its data cache, as
`<data dir>/classifier_<S>px_<L>lv.pt`, one per (image_size, levels); `python
train_classifier.py` (re)trains it.

Sample quality (`quality_metrics`):
- Fréchet distance (FID-style, Heusel et al. 2017) between the classifier's penultimate
  features of n samples and of n test images: |mu_a - mu_b|^2 + tr(Ca + Cb - 2 (Ca Cb)^(1/2)).
  It is biased upwards for finite n, so compare it with the floor: the distance between n
  training and n test images (`frechet_distance_floor`), i.e. what a perfect model would get.
- Conditional models: the fraction of samples of class c that the classifier calls c.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import _compute_fid

from pixelcnn.data import CLASS_NAMES, ImageDataModule, Split
from pixelcnn.ops.datafiles import cache_path, cached, save_cache

EPOCHS = 5  # ~25 s on 2 CPU cores at 16x16, ~88% test accuracy


class FashionClassifier(nn.Module):
    """conv-conv-pool-conv-pool -> 128 features -> 10 classes; works for any image size >= 2."""

    def __init__(self, levels: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.levels = levels

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(1, width), *conv(width, width), nn.MaxPool2d(2, ceil_mode=True),
            *conv(width, 2 * width), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, len(CLASS_NAMES)))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features. (B, 1, S, S) or (B, S, S) integer level images -> (B, feature_dim)"""
        x = images.reshape(-1, 1, *images.shape[-2:]).float() / self.levels  # (B, 1, S, S) as the PixelCNN sees it
        return self.body(x)

    def forward(self, images: Tensor) -> Tensor:  # -> (B, 10) logits
        return self.head(self.features(images))


@torch.no_grad()
def classify(classifier: FashionClassifier, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(features (N, D) float64, predicted classes (N,)) of level images (N, [1,] S, S), on the CPU."""
    device = next(classifier.parameters()).device
    features = torch.cat([classifier.features(batch.to(device)) for batch in images.split(batch_size)])  # (N, D)
    return features.double().cpu(), classifier.head(features).argmax(-1).cpu()


def fit_and_cache(datamodule: ImageDataModule, device: str | torch.device = "cpu", epochs: int = EPOCHS,
                  batch_size: int = 128, lr: float = 3e-3, seed: int = 0) -> FashionClassifier:
    """Train on the (set-up) data module's training split (AdamW, one-cycle schedule), report its test
    accuracy, and save the weights into the cache file in `datamodule.root` (for its image size
    and level count). Returns the classifier in eval mode."""
    started = time.perf_counter()
    torch.manual_seed(seed)  # the initial weights and dropout
    classifier = FashionClassifier(datamodule.levels).to(device)
    images, labels = (t.to(device) for t in datamodule.train_set)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=math.ceil(len(images) / batch_size))
    # The batches' order from a generator of its own: the classifier (and so every Fréchet distance reported
    # in the README) stays the one these seeds gave first.
    generator = torch.Generator(device=images.device).manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator, device=images.device).split(batch_size):
            if len(index) < 2:  # batch norm cannot train on one image (at 2px its maps are 1x1)
                continue
            loss = nn.functional.cross_entropy(classifier(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier.eval()
    test_images, test_labels = datamodule.test_set
    classifier.test_accuracy = (classify(classifier, test_images)[1] == test_labels.cpu()).float().mean().item()
    path = cache_path(datamodule.root, datamodule.image_size, datamodule.levels, "classifier")
    # Said before the write: one that fails (a read-only data dir) says so itself, and only costs the cache.
    print(f"[classifier] {datamodule.image_size}px/{datamodule.levels} levels: test accuracy "
          f"{classifier.test_accuracy:.2%} after {epochs} epochs on {len(images)} images "
          f"({time.perf_counter() - started:.0f} s on {torch.device(device).type}); caching it at {path}", flush=True)
    save_cache(path, {"state_dict": classifier.state_dict(), "test_accuracy": torch.tensor(classifier.test_accuracy)})
    return classifier


def load_or_train_classifier(datamodule: ImageDataModule,
                             device: str | torch.device = "cpu") -> FashionClassifier:
    """The classifier cached in the data module's root for its image size and level count,
    trained on its training split first if there is none (or it is unreadable). Eval mode, on
    `device`, with a `test_accuracy` attribute. Jobs that start together train it once: the
    others wait for it (`datafiles.cached`)."""
    path = cache_path(datamodule.root, datamodule.image_size, datamodule.levels, "classifier")

    def load() -> FashionClassifier | None:  # `cached` checks that the file is there
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            classifier = FashionClassifier(datamodule.levels)
            classifier.load_state_dict(saved["state_dict"])
            classifier.test_accuracy = float(saved["test_accuracy"])
            return classifier.to(device).eval()
        except Exception as err:  # noqa: BLE001 - any unusable cache is retrained
            print(f"[classifier] {path} is unusable ({type(err).__name__}); retraining", flush=True)
            return None

    def train() -> FashionClassifier:
        print(f"[classifier] no cached classifier at {path}: training one (under a minute on a CPU for the full "
              "dataset)", flush=True)
        return fit_and_cache(datamodule, device)

    return cached(path, load, train)


# ---------------------------------------------------------------------------- metrics


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), in float64
    (torchmetrics' FID formula, given our features instead of Inception's)."""
    a, b = feats_a.double(), feats_b.double()
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # (D, D), unbiased as FID
    return max(_compute_fid(a.mean(0), cov_a, b.mean(0), cov_b).item(), 0.0)  # rounding can leave -1e-12


def random_subset(split: Split, n: int, seed: int) -> Tensor:
    """n random images of a split, on the CPU."""
    index = torch.randperm(len(split[0]), generator=torch.Generator().manual_seed(seed))[:n]
    return split[0][index.to(split[0].device)].cpu()


def unscorable(datamodule: ImageDataModule) -> str | None:
    """Why the sample quality of a model of this data is not scored, or None: the classifier is
    Fashion-MNIST's (grey)."""
    if (datamodule.source, datamodule.channels) == ("fashion_mnist", 1):
        return None
    colour = f" with data.channels={datamodule.channels}" if datamodule.channels != 1 else ""
    return f"sample quality skipped: its classifier is Fashion-MNIST's (grey), not data={datamodule.source}{colour}"


def quality_metrics(module, data: ImageDataModule | Split, n: int = 1000, temperature: float = 1.0,
                    seed: int = 0, classifier: FashionClassifier | None = None,
                    method: str = "fast") -> dict[str, float]:
    """Sample quality of an `ImageModel` (a `ImageModule` too), on any device:

    - `frechet_distance`: n samples vs n random test images, in classifier feature space.
    - `frechet_distance_floor` (`data` a data module only): n training vs the same n test images,
      what a perfect model would get at this n.
    - `class_accuracy` (conditional models only): the share of samples, drawn for classes 0..9 in
      turn, that the classifier assigns to their class.
    - `quality_n` (an int): the n used, capped at the test (and a data module's training) images.

    `data` is a set-up `ImageDataModule` (its tensors on any device) or a bare test split (images,
    labels) with its `classifier`. The classifier defaults to the one `load_or_train_classifier`
    gives for the data module.
    """
    datamodule = data if isinstance(data, ImageDataModule) else None
    if datamodule is not None and (datamodule.image_size, datamodule.levels) != (module.image_size, module.levels):
        raise ValueError(f"the data module has {datamodule.image_size}px images with {datamodule.levels} levels, "
                         f"the model {module.image_size}px with {module.levels}")
    test_set, train_set = (data, data) if datamodule is None else (datamodule.test_set, datamodule.train_set)
    available = min(len(test_set[0]), len(train_set[0]))
    if n < 2 or available < 2:
        raise ValueError(f"the Fréchet distance needs n >= 2 samples and test images; got n={n}, "
                         f"{available} images available")
    if n > available:
        print(f"[classifier] quality_n={n} is more than the {available} test (and training) images: using {available}",
              flush=True)
        n = available
    if classifier is None:  # a bare test split comes with its classifier
        classifier = load_or_train_classifier(datamodule, module.device)
    labels = torch.arange(n) % module.num_classes if module.conditional else None
    sample_feats, predicted = classify(classifier, module.sample(n, temperature, seed, labels, method))
    test_feats = classify(classifier, random_subset(test_set, n, seed))[0]
    metrics: dict[str, float] = {"frechet_distance": frechet_distance(sample_feats, test_feats)}
    if datamodule is not None:
        train_feats = classify(classifier, random_subset(train_set, n, seed + 1))[0]
        metrics["frechet_distance_floor"] = frechet_distance(train_feats, test_feats)
    if labels is not None:
        metrics["class_accuracy"] = (predicted == labels).float().mean().item()
    return metrics | {"quality_n": n}
