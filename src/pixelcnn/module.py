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
from pixelcnn.sampling import SamplingMethod, eval_mode, sample

ARCHITECTURES: dict[str, type[nn.Module]] = {"pixelcnn": PixelCNN, "gated": GatedPixelCNN}


def build_network(arch: str, levels: int, num_classes: int, image_channels: int = 1, **arch_kwargs) -> nn.Module:
    """The network `arch` with its own options; an unknown arch or option is a UserError (one line)."""
    if arch not in ARCHITECTURES:
        raise UserError(f"model.arch={arch!r} is unknown: choose one of {sorted(ARCHITECTURES)}")
    # Typically a preset written for the other architecture, e.g. experiment=quick with model=gated.
    shared = {"levels", "num_classes", "image_channels"}
    check_options(arch_kwargs, set(inspect.signature(ARCHITECTURES[arch]).parameters) - shared,
                  "model", f"model.arch={arch}")
    return ARCHITECTURES[arch](levels=levels, num_classes=num_classes, image_channels=image_channels, **arch_kwargs)


class PixelCNNModule(L.LightningModule):
    """Trains any network of `ARCHITECTURES` with cross-entropy over the pixel levels.

    Batches are `(images uint8 (B, C, H, W) of levels 0..levels-1, labels long (B,))`, C =
    `image_channels` (1 grey, 3 RGB); the network sees `images / levels`. `levels` is always the
    number of levels per channel, never a tensor. `class_names` (from the data, saved with the
    checkpoint) name the `num_classes` classes for `sample.py label=<name>`; `data` is the data
    source it was trained on (`pixelcnn.data.ImageDataModule.source_settings`), for the commands
    that read its test split again.
    """

    def __init__(
        self,
        arch: str = "pixelcnn",
        levels: int = 4,
        image_size: int = 16,
        num_classes: int = 0,
        image_channels: int = 1,
        class_names: list[str] | None = None,
        data: dict | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        scheduler: dict | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        accumulate_grad_batches: int = 1,
        **arch_kwargs,
    ):
        """`scheduler` is one of conf/scheduler/ as a dict ({"name": "none"} or None: a constant lr).
        The last three are the Trainer arguments of the same names, with Lightning's meaning; the
        Trainer refuses them under manual optimization, so the module applies them (`training_step`).
        They are training settings, not part of the model: left out of the hyperparameters."""
        super().__init__()
        self.save_hyperparameters(ignore=["gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches"])
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.net = build_network(arch, levels, num_classes, image_channels, **arch_kwargs)
        self.levels, self.image_channels = levels, image_channels
        self.image_size = image_size
        self.conditional = num_classes > 0
        self.loss_fn = self.mean_bits_per_dim  # replaced by a compiled version in `compile_loss`
        # Mean bits/dim over the whole split, per image: the sum and the count are each summed over
        # DDP ranks, so it equals one process's mean. (self.log's sync_dist averages the count as an
        # integer, which truncates when the ranks' shares differ.) "disable": NaN stays NaN, and no
        # NaN check waits for the GPU at every step.
        self.val_bpd, self.test_bpd = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
        self.automatic_optimization = False  # several optimizer steps per batch: see training_step
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        self._accumulated = 0  # micro-batches whose gradients are summed but not yet stepped
        self._cosine: WarmupCosine | None = None  # the cosine schedule, once configure_optimizers made it

    # --- the objective ---------------------------------------------------------------------------
    def mean_bits_per_dim(self, images: Tensor, labels: Tensor) -> Tensor:
        """The loss: mean negative log-likelihood of the batch in bits per dimension. (B, C, H, W) uint8 -> ()"""
        return self.nll_bits_per_pixel(images, labels).mean()

    def nll_bits_per_pixel(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Negative log-likelihood of every pixel in bits per dimension (the mean over its C
        channels, so that the mean over pixels is bits/dim over all C*H*W values).
        (B, C, H, W) uint8 level images -> (B, H, W)"""
        x = images.float() / self.levels  # (B, C, H, W) model input
        logits = self.net(x, labels if self.conditional else None)  # (B, C*L, H, W)
        if images.shape[1] == 1:  # grey: the logits are already (B, L, H, W)
            return F.cross_entropy(logits.float(), images[:, 0].long(), reduction="none") / math.log(2)
        logits = logits.unflatten(1, (images.shape[1], self.levels)).transpose(1, 2)  # (B, L, C, H, W)
        return F.cross_entropy(logits.float(), images.long(), reduction="none").mean(1) / math.log(2)

    @torch.no_grad()
    def nll_maps(self, images: Tensor, labels: Tensor | None = None, batch_size: int = 500) -> Tensor:
        """`nll_bits_per_pixel` of any number of images, in eval mode. (N, C, H, W) uint8 -> (N, H, W) on the CPU"""
        maps = []
        with eval_mode(self):
            for start in range(0, len(images), batch_size):
                batch_labels = labels[start : start + batch_size].to(self.device) if labels is not None else None
                maps.append(self.nll_bits_per_pixel(images[start : start + batch_size].to(self.device), batch_labels).cpu())
        return torch.cat(maps)

    def image_bits_per_dim(self, images: Tensor, labels: Tensor | None = None, batch_size: int = 500) -> Tensor:
        """Bits/dim of each image: (N, C, H, W) uint8 -> (N,) float64. A conditional model without
        labels gives the marginal over classes (uniform prior), -log2(mean_k 2^(-bits(x | k))) / (C * H * W)."""
        if not self.conditional or labels is not None:
            return self.nll_maps(images, labels, batch_size).double().mean((1, 2))
        classes, channels = self.hparams.num_classes, images.shape[1]
        total_bits = torch.stack([self.nll_maps(images, torch.full((len(images),), k), batch_size).double().sum((1, 2))
                                  * channels for k in range(classes)], dim=1)  # (N, K)
        marginal = -(torch.logsumexp(-total_bits * math.log(2), dim=1) - math.log(classes)) / math.log(2)
        return marginal / images[0].numel()

    def compile_loss(self, **compile_kwargs) -> None:
        """Compile the whole loss (input scaling, network, cross-entropy) as one graph; the
        parameters stay in `self.net`, so checkpoints are unchanged."""
        self.loss_fn = torch.compile(self.mean_bits_per_dim, **compile_kwargs)

    def training_step(self, batch: list[tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        """`batch` is a list of micro-batches of `data.batch_size` (see `data.steps_per_batch`):
        several optimizer steps per Lightning batch pay the loop's fixed cost once. Each
        micro-batch is what Lightning calls a batch: the optimizer steps once per
        `accumulate_grad_batches` of them (each loss scaled by 1/N, so the step sees the mean
        gradient), counted across Lightning batches; the epoch's last micro-batch closes a short
        group, as in Lightning. Returns the K micro-batches' losses (K,), detached."""
        optimizer, trainer, accumulate = self.optimizers(), self.trainer, self.accumulate_grad_batches
        schedulers = trainer.lr_scheduler_configs
        step_scheduler = schedulers[0].scheduler if schedulers and schedulers[0].interval == "step" else None
        # trainer.max_steps counts optimizer steps: stop at it exactly, not at the end of the Lightning batch.
        steps_left = trainer.max_steps - trainer.global_step if trainer.max_steps >= 0 else -1
        epoch_ends_here = batch_idx + 1 == trainer.num_training_batches
        losses, sizes = [], []
        for i, (images, labels) in enumerate(batch):
            if self._accumulated == 0:
                optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(images, labels)
            self.manual_backward(loss if accumulate == 1 else loss / accumulate)
            # A copy: compiled (CUDA-graph) outputs are overwritten by the next call. No host sync.
            losses.append(loss.detach().clone())
            sizes.append(len(images))
            self._accumulated += 1
            if self._accumulated == accumulate or (epoch_ends_here and i == len(batch) - 1):
                optimizer.step()  # clipping happens in `on_before_optimizer_step`, on unscaled gradients
                self._accumulated = 0
                if step_scheduler is not None:
                    step_scheduler.step()
                steps_left -= 1
                if steps_left == 0:
                    break
        stacked = torch.stack(losses)  # (K,) bits/dim of each micro-batch
        count = sum(sizes)
        # Mean over images: only the epoch's last micro-batch can be shorter.
        mean = stacked.mean() if min(sizes) == max(sizes) else sum(x * n for x, n in zip(losses, sizes)) / count
        # on_step values are read back only every `log_every_n_steps`: no per-step host sync.
        self.log("train/bpd", mean, on_step=True, on_epoch=True, prog_bar=True, batch_size=count)
        return stacked

    def on_train_epoch_start(self) -> None:
        self._accumulated = 0  # a group cut short (max_steps, max_time, a resume) is not carried over

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this inside `optimizer.step()`, after AMP has unscaled the gradients:
        # where it clips them itself under automatic optimization.
        if self.gradient_clip_val:
            self.configure_gradient_clipping(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def on_validation_epoch_end(self) -> None:
        # A plateau scheduler steps on each validation's bits/dim during fit (patience counts validations).
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        schedulers = self.trainer.lr_scheduler_configs if fitting else []
        if schedulers and isinstance(schedulers[0].scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            schedulers[0].scheduler.step(self.trainer.callback_metrics["val/bpd"])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Once per image, so that MeanMetric counts images (its `weight` is ignored with nan_strategy="disable").
        self.val_bpd.update(self.loss_fn(*batch).expand(len(batch[0])))
        self.log("val/bpd", self.val_bpd, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_bpd.update(self.loss_fn(*batch).expand(len(batch[0])))
        self.log("test/bpd", self.test_bpd)

    def configure_optimizers(self):
        """AdamW, and the configured lr scheduler in Lightning's dict form (so LearningRateMonitor
        logs it and checkpoints keep its state). Manual optimization steps it: see training_step."""
        # AdamW with weight_decay=0 is exactly Adam. Fused runs the whole update in a few kernels
        # on CUDA; foreach is the fast path elsewhere. Fused unscales fp16 gradients inside its
        # step, too late for clipping, so clipping under 16-mixed takes the foreach path.
        fused = self.device.type == "cuda" and not (self.gradient_clip_val and self.trainer.precision == "16-mixed")
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                      **({"fused": True} if fused else {"foreach": True}))
        scheduler = dict(self.hparams.scheduler or {"name": "none"})
        name, self._cosine = scheduler.pop("name"), None
        if name == "none":
            return optimizer
        if name == "cosine":  # its run length is known once the train loader is: see on_train_start
            self._cosine = WarmupCosine(scheduler["warmup_steps"], scheduler["final_lr_ratio"])
            config = {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, self._cosine), "interval": "step"}
        elif name == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=scheduler["factor"], patience=scheduler["patience"],
                min_lr=self.hparams.lr * scheduler["min_lr_ratio"])
            config = {"scheduler": plateau, "interval": "epoch"}  # stepped by on_validation_epoch_end
        else:
            raise ValueError(f"unknown scheduler {name!r}: none, cosine or plateau")
        return {"optimizer": optimizer, "lr_scheduler": {**config, "name": "train/lr"}}

    def on_train_start(self) -> None:
        # Here, not in configure_optimizers: setting the train loader up that early (Lightning's
        # `estimated_stepping_batches`) makes a resume skip the loader's saved state (Lightning #20550).
        if self._cosine is not None:
            self._cosine.total_steps = self.planned_optimizer_steps()

    def planned_optimizer_steps(self) -> int:
        """Optimizer steps of the whole fit: per epoch, batches of `data.batch_size` (after
        limit_train_batches) / accumulate_grad_batches, rounded up, times max_epochs; at most
        max_steps. (Lightning's `estimated_stepping_batches` counts Lightning batches, each of
        which holds several steps here.) Needs the train loader: from on_train_start on."""
        trainer = self.trainer
        total = math.inf if trainer.max_steps < 0 else trainer.max_steps
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            loader = trainer.train_dataloader
            # Batches of data.batch_size: a BatchLoader counts them; Lightning counts its items (lists of
            # steps_per_batch of them), which its own limit_train_batches (bench.py) may cut further.
            batches = min(getattr(loader, "num_batches", math.inf),
                          trainer.num_training_batches * (getattr(loader, "steps_per_batch", None) or 1))
            total = min(total, math.ceil(batches / self.accumulate_grad_batches) * max(trainer.max_epochs, 1))
        if total == math.inf:
            raise ValueError("a cosine schedule needs a finite run: set trainer.max_epochs or trainer.max_steps")
        return int(total)

    # --- generation ------------------------------------------------------------------------------
    def sample(self, n: int, temperature: float = 1.0, seed: int | None = None, labels: Tensor | None = None,
               method: SamplingMethod = "fast") -> Tensor:
        """Draw n images as (n, H, W) grey or (n, C, H, W) colour long levels. Conditional models need `labels` (n,)."""
        if self.conditional and labels is None:
            raise ValueError("this model is class-conditional: pass labels (one class index per image)")
        return sample(self.net, n, self.image_size, self.image_size, temperature, seed,
                      labels if self.conditional else None, method)


class WarmupCosine:
    """LambdaLR's lr factor of optimizer step s (0-based): a linear warm-up, (s+1)/(W+1) for
    s < W = warmup_steps, then a cosine from 1 at step W to `final_ratio` at the run's last step,
    total_steps - 1 (and after it).

    A closed form in a LambdaLR rather than SequentialLR(LinearLR, CosineAnnealingLR): those
    update the lr recursively, so a resumed run whose length changed (more epochs) would follow
    neither schedule, and CosineAnnealingLR climbs back up after its end. The run length is set
    once the trainer knows it (`total_steps`); the first step's factor does not depend on it.
    LambdaLR checkpoints this object's attributes (plain numbers).
    """

    def __init__(self, warmup_steps: int, final_ratio: float, total_steps: int | None = None):
        self.warmup_steps, self.final_ratio, self.total_steps = warmup_steps, final_ratio, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step == self.warmup_steps:
            return 1.0
        if self.total_steps is None:
            raise RuntimeError("WarmupCosine.total_steps must be set before the schedule goes past its warm-up")
        progress = min((step - self.warmup_steps) / max(self.total_steps - 1 - self.warmup_steps, 1), 1.0)
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
