"""The LightningModule: an autoregressive image model trained by maximum likelihood.

It takes plain arguments and saves them with `save_hyperparameters()`, so a checkpoint alone
rebuilds the network (`PixelCNNModule.load_from_checkpoint(path)`); `sample.py` and
`evaluate.py` need nothing else. Losses are reported in bits per dimension (nats / ln 2);
guessing uniformly among L levels costs log2(L) bits (2.0 for 4 levels).
"""

from __future__ import annotations

import inspect
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from pixelcnn.config import UserError, check_options
from pixelcnn.gated import GatedPixelCNN
from pixelcnn.model import PixelCNN
from pixelcnn.sampling import SamplingMethod, sample

ARCHITECTURES: dict[str, type[nn.Module]] = {"pixelcnn": PixelCNN, "gated": GatedPixelCNN}


def build_network(arch: str, levels: int, num_classes: int, **arch_kwargs) -> nn.Module:
    """The network `arch` with its own options; an unknown arch or option is a UserError (one line)."""
    if arch not in ARCHITECTURES:
        raise UserError(f"model.arch={arch!r} is unknown: choose one of {sorted(ARCHITECTURES)}")
    # Typically a preset written for the other architecture, e.g. experiment=quick with model=gated.
    check_options(arch_kwargs, set(inspect.signature(ARCHITECTURES[arch]).parameters) - {"levels", "num_classes"},
                  "model", f"model.arch={arch}")
    return ARCHITECTURES[arch](levels=levels, num_classes=num_classes, **arch_kwargs)


class PixelCNNModule(L.LightningModule):
    """Trains any network of `ARCHITECTURES` with cross-entropy over the pixel levels.

    Batches are `(levels uint8 (B, 1, H, W), labels long (B,))`; the network sees `level / levels`.
    """

    def __init__(
        self,
        arch: str = "pixelcnn",
        levels: int = 4,
        image_size: int = 16,
        num_classes: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        **arch_kwargs,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(arch, levels, num_classes, **arch_kwargs)
        self.levels = levels
        self.image_size = image_size
        self.conditional = num_classes > 0
        self.loss_fn = self.bits_per_dim  # replaced by a compiled version in `compile_loss`
        # Mean bits/dim over the whole split, per image: the sum and the count are each summed over
        # DDP ranks, so it equals one process's mean. (self.log's sync_dist averages the count as an
        # integer, which truncates when the ranks' shares differ.) "disable": NaN stays NaN, and no
        # NaN check waits for the GPU at every step.
        self.val_bpd, self.test_bpd = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
        self.automatic_optimization = False  # several optimizer steps per batch: see training_step

    # --- the objective ---------------------------------------------------------------------------
    def bits_per_dim(self, levels: Tensor, labels: Tensor) -> Tensor:
        """Mean negative log-likelihood of the batch in bits per pixel. (B, 1, H, W) uint8 -> ()"""
        return self.nll_bits_per_pixel(levels, labels).mean()

    def nll_bits_per_pixel(self, levels: Tensor, labels: Tensor | None = None) -> Tensor:
        """Negative log-likelihood of every pixel in bits. (B, 1, H, W) uint8 levels -> (B, H, W)"""
        x = levels.float() / self.levels  # (B, 1, H, W) model input
        logits = self.net(x, labels if self.conditional else None)  # (B, L, H, W)
        return F.cross_entropy(logits.float(), levels[:, 0].long(), reduction="none") / math.log(2)

    def compile_loss(self, **compile_kwargs) -> None:
        """Compile the whole loss (input scaling, network, cross-entropy) as one graph; the
        parameters stay in `self.net`, so checkpoints are unchanged."""
        self.loss_fn = torch.compile(self.bits_per_dim, **compile_kwargs)

    def training_step(self, batch: list[tuple[Tensor, Tensor]], batch_idx: int) -> dict[str, Tensor]:
        """`batch` is a list of micro-batches, each with its own optimizer step (see
        `data.steps_per_batch`): several steps per Lightning batch pay the loop's fixed cost once.
        Returns the loss of each step, (K,) on the device, for callbacks (StopOnNonFiniteLoss)."""
        optimizer = self.optimizers()
        total, count, step_losses = 0.0, 0, []
        for levels, labels in batch:
            loss = self.loss_fn(levels, labels)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
            total, count = total + loss.detach() * len(levels), count + len(levels)
            step_losses.append(loss.detach())
        # on_step values are read back only every `log_every_n_steps`: no per-step host sync.
        self.log("train/bpd", total / count, on_step=True, on_epoch=True, prog_bar=True, batch_size=count)
        return {"step_losses": torch.stack(step_losses)}  # (K,)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_bpd.update(self.per_image(self.loss_fn(*batch), batch))
        self.log("val/bpd", self.val_bpd, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_bpd.update(self.per_image(self.loss_fn(*batch), batch))
        self.log("test/bpd", self.test_bpd)

    @staticmethod
    def per_image(batch_mean: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The batch's mean once per image, () -> (B,): MeanMetric then counts images. (Its `weight`
        argument would do this, but torchmetrics ignores it with nan_strategy="disable".)"""
        return batch_mean.expand(batch[0].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # AdamW with weight_decay=0 is exactly Adam. Fused runs the whole update in a few kernels
        # on CUDA; foreach is the fast path elsewhere.
        fast_path = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                 **fast_path)

    # --- generation ------------------------------------------------------------------------------
    def sample(self, n: int, temperature: float = 1.0, seed: int | None = None, labels: Tensor | None = None,
               method: SamplingMethod = "fast") -> Tensor:
        """Draw n images as (n, H, W) long levels. Conditional models need `labels` (n,)."""
        if self.conditional and labels is None:
            raise ValueError("this model is class-conditional: pass labels (one class index per image)")
        return sample(self.net, n, self.image_size, self.image_size, temperature, seed,
                      labels if self.conditional else None, method)
