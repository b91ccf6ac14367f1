"""A trained autoregressive image model without its training: the network (one
of `ARCHITECTURES`), the likelihood it gives images, in bits, and its samples.

It imports neither Lightning, nor the data module, nor the ops wing, so that `sample.py` and `evaluate.py` load a
checkpoint quickly (`pixelcnn.ops.checkpoints.load_module`); `pixelcnn.module.ImageModule` is this
model with its training. Guessing uniformly among L levels costs log2(L) bits (2.0 for 4 levels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixelcnn.gated_net import GatedPixelCNN
from pixelcnn.pixelcnn_net import PixelCNN
from pixelcnn.sampling import SamplingMethod, eval_mode, sample

ARCHITECTURES: dict[str, type[nn.Module]] = {"pixelcnn": PixelCNN, "gated": GatedPixelCNN}
LEGACY_OPTIM_KEYS = ("lr", "weight_decay", "scheduler")  # hyperparameters before the optim group: now in `optim`
# Hyperparameters of the training, not of the network: the optim group, and the decay of the weight
# average whose weights a checkpoint holds (`model.ema_decay`).
TRAINING_KEYS = ("optim", "ema_decay", *LEGACY_OPTIM_KEYS)


class ImageModel(nn.Module):
    """The network `arch` for `image_size` x `image_size` images of `image_channels` channels (1 grey,
    3 RGB) with `levels` levels each, and `num_classes` classes to condition on (0: unconditional),
    named by `class_names` (from the data, for `sample.py label=<name>`). `data` is the data source
    it was trained on (`pixelcnn.data.ImageDataModule.source_settings`), for the commands that read
    its test split again. Its only weights are `net`'s."""

    def __init__(self, arch: str = "pixelcnn", levels: int = 4, image_size: int = 16, num_classes: int = 0,
                 image_channels: int = 1, class_names: list[str] | None = None, data: dict | None = None,
                 net: nn.Module | None = None, **arch_kwargs):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        # The network's options are checked where a config or a checkpoint is read (`pixelcnn.ops.rules.network_error`).
        # `net`: built from these same options by training.build_network; else built here (from a checkpoint).
        self.net = net if net is not None else ARCHITECTURES[arch](levels=levels, num_classes=num_classes,
                                                                   image_channels=image_channels, **arch_kwargs)
        self.levels, self.image_size, self.num_classes = levels, image_size, num_classes
        self.image_channels, self.class_names, self.data = image_channels, class_names, data
        self.conditional = num_classes > 0

    @classmethod
    def from_hparams(cls, hparams: dict) -> ImageModel:
        """The model of a checkpoint's hyperparameters, those of the training (optimizer, schedule)
        left out; any other key is the network's."""
        return cls(**{key: value for key, value in hparams.items() if key not in TRAINING_KEYS})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- likelihood ------------------------------------------------------------------------------
    def mean_bits_per_dim(self, images: Tensor, labels: Tensor) -> Tensor:
        """The loss: mean negative log-likelihood of the batch in bits per dimension. (B, C, H, W) uint8 -> ()"""
        return self.nll_bits_per_pixel(images, labels).mean()

    def nll_bits_per_pixel(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Negative log-likelihood of every pixel in bits per dimension (the mean over its C
        channels, so that the mean over pixels is bits/dim over all C*H*W values).
        (B, C, H, W) uint8 level images -> (B, H, W)"""
        x = images.to(next(self.net.parameters()).dtype) / self.levels  # (B, C, H, W) model input, as the weights
        logits = self.net(x, labels if self.conditional else None)  # (B, C*L, H, W)
        logits = logits.unflatten(1, (images.shape[1], self.levels)).transpose(1, 2)  # (B, L, C, H, W)
        return F.cross_entropy(logits.float(), images.long(), reduction="none").mean(1) / math.log(2)

    @torch.no_grad()
    def nll_maps(self, images: Tensor, labels: Tensor | None = None, batch_size: int = 500) -> Tensor:
        """`nll_bits_per_pixel` of any number of images, in eval mode. (N, C, H, W) uint8 -> (N, H, W) on the CPU"""
        maps = []
        with eval_mode(self):
            for start in range(0, len(images), batch_size):
                batch = slice(start, start + batch_size)
                batch_labels = labels[batch].to(self.device) if labels is not None else None
                maps.append(self.nll_bits_per_pixel(images[batch].to(self.device), batch_labels).cpu())
        return torch.cat(maps)

    def image_bits_per_dim(self, images: Tensor, labels: Tensor | None = None, batch_size: int = 500) -> Tensor:
        """Bits/dim of each image: (N, C, H, W) uint8 -> (N,) float64. A conditional model without
        labels gives the marginal over classes (uniform prior), -log2(mean_k 2^(-bits(x | k))) / (C * H * W)."""
        if not self.conditional or labels is not None:
            return self.nll_maps(images, labels, batch_size).double().mean((1, 2))
        classes, channels = self.num_classes, images.shape[1]
        total_bits = torch.stack([self.nll_maps(images, torch.full((len(images),), k), batch_size).double().sum((1, 2))
                                  * channels for k in range(classes)], dim=1)  # (N, K)
        marginal = -(torch.logsumexp(-total_bits * math.log(2), dim=1) - math.log(classes)) / math.log(2)
        return marginal / images[0].numel()

    # --- generation ------------------------------------------------------------------------------
    def sample(self, n: int, temperature: float = 1.0, seed: int | None = None, labels: Tensor | None = None,
               method: SamplingMethod = "fast") -> Tensor:
        """Draw n images as (n, H, W) grey or (n, C, H, W) colour long levels. Conditional models need `labels` (n,)."""
        return sample(self.net, n, self.image_size, self.image_size, temperature, seed,
                      labels if self.conditional else None, method)
