"""The LightningModule: an autoregressive image model (`pixelcnn.likelihood.ImageModel`: the
network, its likelihood and samples) trained by maximum likelihood.

It takes plain arguments and saves them with `save_hyperparameters()`, so a checkpoint alone
rebuilds the network: `sample.py` and `evaluate.py` need nothing else, and load it without
Lightning (`pixelcnn.ops.checkpoints.load_module`). Losses are reported in bits per dimension.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from pixelcnn.likelihood import LEGACY_OPTIM_KEYS, ImageModel

DEFAULT_OPTIM = {"lr": 1e-4, "weight_decay": 0.0, "scheduler": {"name": "none"}}  # conf/optim/adamw.yaml's


def saved_optim(hparams: dict) -> dict:
    """The optim settings of a checkpoint's hyperparameters (those from before the optim group
    kept lr, weight_decay and scheduler among the model's; a scheduler of None was a constant lr)."""
    legacy = {key: hparams[key] for key in LEGACY_OPTIM_KEYS if hparams.get(key) is not None}
    return {**DEFAULT_OPTIM, **(hparams.get("optim") or legacy)}


class ImageModule(ImageModel, L.LightningModule):
    """Trains any network of `likelihood.ARCHITECTURES` with cross-entropy over the pixel levels.
    Batches are `(images uint8 (B, C, H, W) of levels 0..levels-1, labels long (B,))`, C =
    `image_channels` (1 grey, 3 RGB); the network sees `images / levels`. The other arguments
    (`class_names`, `data`: saved with the checkpoint) are `ImageModel`'s."""

    device = L.LightningModule.device  # Lightning's (it tracks the module's moves), not ImageModel's

    def __init__(
        self,
        arch: str = "pixelcnn",
        levels: int = 4,
        image_size: int = 16,
        num_classes: int = 0,
        image_channels: int = 1,
        class_names: list[str] | None = None,
        data: dict | None = None,
        optim: dict | None = None,
        ema_decay: float = 0.0,
        net: torch.nn.Module | None = None,
        **arch_kwargs,
    ):
        """`optim` is the optim group as a dict: lr, weight_decay, scheduler (one of conf/optim/scheduler/).
        `ema_decay` > 0: the training keeps a weight average (`ops.callbacks.build_callbacks`), which is saved
        so that a checkpoint says which weights it holds."""
        super().__init__(arch, levels, image_size, num_classes, image_channels, class_names, data, net, **arch_kwargs)
        self.save_hyperparameters(ignore=["net"])  # the network's own options are among them: a checkpoint rebuilds it
        self.loss_fn = self.mean_bits_per_dim  # or its compiled version (`training.build_module`)
        # Mean bits/dim over the whole split, per image: the sum and the count are each summed over
        # DDP ranks, so it equals one process's mean. (self.log's sync_dist averages the count as an
        # integer, which truncates when the ranks' shares differ.) "disable": NaN stays NaN, and no
        # NaN check waits for the GPU at every step.
        self.val_bpd, self.test_bpd = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
        self._cosine: WarmupCosine | None = None  # the cosine schedule, once configure_optimizers made it
        self._resumed_optim: dict | None = None  # the optim settings a resumed checkpoint was saved with

    # --- the objective: ImageModel.mean_bits_per_dim ----------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss_fn(*batch)
        # on_step values are read back only every `log_every_n_steps`: no per-step host sync.
        self.log("train/bpd", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Once per image, so that MeanMetric counts images (its `weight` is ignored with nan_strategy="disable").
        self.val_bpd.update(self.loss_fn(*batch).expand(len(batch[0])))
        self.log("val/bpd", self.val_bpd, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_bpd.update(self.loss_fn(*batch).expand(len(batch[0])))
        self.log("test/bpd", self.test_bpd)

    def configure_optimizers(self):
        """AdamW, and the configured lr scheduler in Lightning's dict form (so LearningRateMonitor
        logs it, checkpoints keep its state and Lightning steps it)."""
        # AdamW with weight_decay=0 is exactly Adam. Fused runs the whole update in a few kernels
        # on CUDA; foreach is the fast path elsewhere. Fused unscales fp16 gradients inside its
        # step, too late for clipping, so clipping under 16-mixed takes the foreach path.
        cuda = self.device.type == "cuda"  # on CUDA the module is always attached to a trainer
        fused = cuda and not (self.trainer.gradient_clip_val and self.trainer.precision == "16-mixed")
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.optim["lr"], weight_decay=self.optim["weight_decay"],
                                      **({"fused": True} if fused else {"foreach": True}))
        scheduler, self._cosine = self.optim["scheduler"], None
        if scheduler["name"] == "none":
            return optimizer
        if scheduler["name"] == "cosine":  # its run length is known once the train loader is: see on_train_start
            self._cosine = WarmupCosine(scheduler["warmup_steps"], scheduler["final_lr_ratio"])
            config = {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, self._cosine), "interval": "step"}
        else:  # plateau (config.RULES allow these three)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=scheduler["factor"], patience=scheduler["patience"],
                min_lr=self.optim["lr"] * scheduler["min_lr_ratio"])
            # Stepped by Lightning on val/bpd after each epoch that validates.
            config = {"scheduler": plateau, "interval": "epoch", "monitor": "val/bpd",
                      "frequency": self.trainer.check_val_every_n_epoch or 1}
        return {"optimizer": optimizer, "lr_scheduler": {**config, "name": "train/lr"}}

    @property
    def optim(self) -> dict:
        """The optimizer settings: the `optim` argument, with defaults."""
        return saved_optim(self.hparams)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_optim = saved_optim(checkpoint.get("hyper_parameters", {}))
        # A run with a weight average saved it as the state_dict and its raw weights beside: a resume
        # without one (model.ema_decay=0) continues the raw weights. (With one, WeightAverage loads both.)
        if "current_model_state" in checkpoint and not self.hparams.get("ema_decay") and self.trainer.state.fn == "fit":
            checkpoint["state_dict"] = checkpoint["current_model_state"]

    def on_train_start(self) -> None:
        # Here, not in configure_optimizers: setting the train loader up that early (Lightning's
        # `estimated_stepping_batches`) makes a resume skip the loader's saved state (Lightning #20550).
        if self._cosine is not None:
            if (total := self.trainer.estimated_stepping_batches) == math.inf:
                raise ValueError("a cosine schedule needs a finite run: set trainer.max_epochs or trainer.max_steps")
            self._cosine.total_steps = total
        if self._resumed_optim is not None and self._resumed_optim != self.optim:
            self.apply_changed_optim(self._resumed_optim)

    def apply_changed_optim(self, saved: dict) -> None:
        """A resume with other optim settings than the run's: Lightning has restored the saved
        ones into the optimizer and scheduler, so the configured ones are put there. The schedule
        keeps its position (cosine: recomputed at its step; plateau: its reductions so far kept)."""
        optim, settings, optimizer = self.optim, self.optim["scheduler"], self.optimizers().optimizer
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler if self.trainer.lr_scheduler_configs else None
        for group in optimizer.param_groups:
            group["weight_decay"], group["initial_lr"] = optim["weight_decay"], optim["lr"]
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # cosine; its lambda held the saved settings
                self._cosine.warmup_steps = settings["warmup_steps"]
                self._cosine.final_ratio = settings["final_lr_ratio"]
                scheduler.base_lrs = [optim["lr"]] * len(optimizer.param_groups)
                group["lr"] = optim["lr"] * self._cosine(scheduler.last_epoch)
            elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.factor, scheduler.patience = settings["factor"], settings["patience"]
                scheduler.min_lrs = [optim["lr"] * settings["min_lr_ratio"]] * len(optimizer.param_groups)
                group["lr"] = max(group["lr"] * optim["lr"] / saved["lr"], scheduler.min_lrs[0])
            else:
                group["lr"] = optim["lr"]
        if self.trainer.is_global_zero:
            changes = [f"optim.{k}={optim[k]} (was {saved.get(k)})" for k in optim if optim[k] != saved.get(k)]
            print(f"[pixelcnn] resumed with other optimizer settings, now used: {', '.join(changes)}; the lr is now "
                  f"{optimizer.param_groups[0]['lr']:.4g}", flush=True)


class WarmupCosine:
    """LambdaLR's lr factor of optimizer step s (0-based): a linear warm-up, (s+1)/(W+1) for
    s < W = warmup_steps, then a cosine from 1 at step W to `final_ratio` at the run's last step,
    total_steps - 1 (and after it); `total_steps` is set in on_train_start (the first step's factor
    does not depend on it). LambdaLR checkpoints this object's attributes (plain numbers).

    A closed form, not SequentialLR(LinearLR, CosineAnnealingLR): those update the lr recursively, so
    a resumed run whose length changed (more epochs) would follow neither schedule, and
    CosineAnnealingLR climbs back up after its end."""

    def __init__(self, warmup_steps: int, final_ratio: float):
        self.warmup_steps, self.final_ratio, self.total_steps = warmup_steps, final_ratio, None

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step == self.warmup_steps:
            return 1.0
        progress = min((step - self.warmup_steps) / max(self.total_steps - 1 - self.warmup_steps, 1), 1.0)
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
