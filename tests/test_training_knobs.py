"""Lightning's training knobs through the project's module and loader: gradient clipping, gradient
accumulation, lr schedulers, and limits counted in optimizer steps. Each test runs a tiny model through a real Trainer on a few tensors."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from pixelcnn.ops.checkpoints import check_same_network, load_module
from pixelcnn.ops.errors import UserError
from pixelcnn.data import BatchLoader
from pixelcnn.gated_net import GatedPixelCNN
from pixelcnn.module import DEFAULT_OPTIM, ImageModule

ROOT = Path(__file__).resolve().parents[1]

LR = 1e-2


def tiny(**kwargs) -> ImageModule:
    torch.manual_seed(0)  # the same initial weights for every module of a test
    optim = {"lr": kwargs.pop("lr", LR), "weight_decay": 0.0, "scheduler": kwargs.pop("scheduler", {"name": "none"})}
    return ImageModule(**{"filters": 4, "residual_blocks": 0, "image_size": 6, "optim": optim, **kwargs})


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 1, 6, 6) of levels 0..3 and their labels (n,), the same for every call."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 4, (n, 1, 6, 6), dtype=torch.uint8, generator=generator), torch.zeros(n, dtype=torch.long)


def fit(module: ImageModule, loader, val_loader=None, callbacks=(), ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(**{"max_epochs": 1, **trainer_kwargs}, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader, ckpt_path=ckpt_path, weights_only=True)
    return trainer


class OptimizerSpy(L.Callback):
    """Calls `measure(optimizer)` at every optimizer step: `when` "pre" (before the update, where
    the lr is the one about to be used) or "post" (after it: the gradient it used, clipped)."""

    def __init__(self, measure, when: str):
        self.measure, self.when, self.values = measure, when, []

    def on_train_start(self, trainer, module) -> None:
        optimizer = trainer.optimizers[0]
        hook = optimizer.register_step_pre_hook if self.when == "pre" else optimizer.register_step_post_hook
        hook(lambda opt, args, kwargs: self.values.append(self.measure(opt)))


def gradient_size(algorithm: str):
    def measure(optimizer) -> float:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if algorithm == "norm":
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        return max(g.abs().max().item() for g in grads)

    return measure


# --- gradient clipping -----------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_bounds_the_gradient_of_every_step(algorithm: str):
    """A huge-gradient batch (output layer scaled by 1000): without clipping the optimizer steps
    with a gradient far above 1; with trainer.gradient_clip_val=1 every step's is <= 1."""
    def step_gradients(clip_val: float | None) -> list[float]:
        module = tiny()
        with torch.no_grad():
            module.net.to_logits.weight.mul_(1000)
        spy = OptimizerSpy(gradient_size(algorithm), "post")
        fit(module, BatchLoader(*data(48), 8), callbacks=[spy], gradient_clip_val=clip_val,
            gradient_clip_algorithm=algorithm)
        return spy.values

    assert len(unclipped := step_gradients(None)) == 6 and min(unclipped) > 10
    clipped = step_gradients(1.0)
    assert len(clipped) == 6 and max(clipped) <= 1.0 + 1e-5
    if algorithm == "norm":  # scaled down to the bound, not zeroed
        assert min(clipped) == pytest.approx(1.0, rel=1e-4)


# --- gradient accumulation -------------------------------------------------------------------------
def test_accumulating_two_batches_of_8_is_one_batch_of_16():
    images, labels = data(48)
    whole = tiny()
    whole_trainer = fit(whole, BatchLoader(images, labels, 16))
    accumulated = tiny()
    trainer = fit(accumulated, BatchLoader(images, labels, 8), accumulate_grad_batches=2)
    assert trainer.global_step == 3  # optimizer steps
    for (name, p), q in zip(whole.named_parameters(), accumulated.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    # Adam's moments hold the gradients themselves (its update hardly depends on their scale).
    for p, q in zip(whole_trainer.optimizers[0].state.values(), trainer.optimizers[0].state.values()):
        assert torch.allclose(p["exp_avg"], q["exp_avg"], rtol=1e-5, atol=1e-9)
    assert not torch.equal(whole.net.to_logits.weight, tiny().net.to_logits.weight)  # it did train


def test_an_epochs_last_batches_make_a_short_accumulation_group():
    """5 batches of 8, accumulating 2: steps after batches 2, 4 and 5 (the epoch's end), every epoch."""
    trainer = fit(tiny(), BatchLoader(*data(40), 8), max_epochs=2, accumulate_grad_batches=2)
    assert trainer.global_step == 6
    assert trainer.optimizers[0].state_dict()["state"][0]["step"] == 6


# --- learning-rate schedulers ----------------------------------------------------------------------
def expected_cosine_lr(step: int, warmup: int, total: int, final: float) -> float:
    """The documented schedule (conf/optim/scheduler/cosine.yaml), written out independently."""
    if step < warmup:
        return LR * (step + 1) / (warmup + 1)
    progress = (step - warmup) / (total - 1 - warmup)
    return LR * (final + (1 - final) * (1 + math.cos(math.pi * progress)) / 2)


@pytest.mark.parametrize("accumulate, limit, total", [
    (1, None, 12),  # 6 batches of 8 per epoch, 2 epochs
    (2, 5, 6),  # 5 batches per epoch (limit) -> 3 optimizer steps per epoch
])
def test_cosine_lr_of_every_step_follows_the_formula(accumulate: int, limit, total: int):
    module = tiny(scheduler={"name": "cosine", "warmup_steps": 3, "final_lr_ratio": 0.1})
    spy = OptimizerSpy(lambda optimizer: optimizer.param_groups[0]["lr"], "pre")
    trainer = fit(module, BatchLoader(*data(48), 8, shuffle=True, seed=0), callbacks=[spy], max_epochs=2,
                  accumulate_grad_batches=accumulate, limit_train_batches=limit)
    assert trainer.global_step == total == len(spy.values)
    assert spy.values == pytest.approx([expected_cosine_lr(s, 3, total, 0.1) for s in range(total)], rel=1e-9)
    assert spy.values[3] == pytest.approx(LR) and spy.values[-1] == pytest.approx(0.1 * LR)


@pytest.mark.parametrize("every", [1, 2])  # trainer.check_val_every_n_epoch
def test_plateau_halves_the_lr_when_val_stalls(every: int):
    """At lr 1e-6 val bits/dim cannot improve by the relative 1e-4 needed: with patience 0 each validation after the first
    halves the lr (Lightning steps the plateau after each epoch that validates)."""
    module = tiny(lr=1e-6, scheduler={"name": "plateau", "factor": 0.5, "patience": 0, "min_lr_ratio": 0.0})
    images, labels = data(48)
    trainer = fit(module, BatchLoader(images, labels, 8), BatchLoader(images[:16], labels[:16], 16),
                  max_epochs=3 * every, check_val_every_n_epoch=every)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-6 / 4)


def test_a_resume_keeps_the_schedule_and_old_checkpoints_had_none():
    """A resume continues the saved schedule's state: one with another kind of schedule is
    refused; checkpoints from before the option trained at a constant lr, so resume with none.
    (Older checkpoints kept lr and scheduler among the model's hyperparameters.)"""
    model = {"arch": "pixelcnn", "lr": 1e-4}
    none, cosine = {"name": "none"}, {"name": "cosine", "warmup_steps": 0, "final_lr_ratio": 0.01}

    def config(scheduler: dict) -> OmegaConf:
        return OmegaConf.create({"model": {"arch": "pixelcnn"}, "optim": {"lr": 1e-4, "scheduler": scheduler}})

    check_same_network(model, config(none), Path("old.ckpt"), key="ckpt_path")
    check_same_network({**model, "scheduler": cosine}, config(cosine), Path("new.ckpt"), key="ckpt_path")
    check_same_network({"arch": "pixelcnn", "optim": {"lr": 1e-3, "scheduler": cosine}}, config(cosine),
                       Path("new.ckpt"), key="ckpt_path")  # the lr may change
    with pytest.raises(UserError, match="optim/scheduler="):
        check_same_network(model, config(cosine), Path("old.ckpt"), key="ckpt_path")
    check_same_network(model, config(cosine), Path("old.ckpt"), key="init_from")  # a new run: a new schedule


def test_a_checkpoint_from_before_the_optim_group_loads_and_resumes(tmp_path: Path):
    """Checkpoints saved before the optim group kept lr, weight_decay and scheduler (None: a constant lr)
    among the model's hyperparameters (`image_model.LEGACY_OPTIM_KEYS`): sample.py and evaluate.py load
    them (`load_module`), and a resume reads the saved optimizer settings there, so that a resume with
    other settings (here the defaults) puts those in."""
    fit(tiny(), BatchLoader(*data(32), 8), max_epochs=1).save_checkpoint(tmp_path / "new.ckpt")  # 4 steps at LR
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    hparams.update({**hparams.pop("optim"), "scheduler": None})
    assert {"lr", "weight_decay", "scheduler"} <= set(hparams) and hparams["lr"] == LR
    torch.save(checkpoint, tmp_path / "old.ckpt")
    images = data(8)[0]
    assert torch.equal(load_module(tmp_path / "old.ckpt").image_bits_per_dim(images),
                       load_module(tmp_path / "new.ckpt").image_bits_per_dim(images))
    spy = OptimizerSpy(lambda optimizer: optimizer.param_groups[0]["lr"], "pre")
    fit(tiny(lr=DEFAULT_OPTIM["lr"]), BatchLoader(*data(32), 8), callbacks=[spy], ckpt_path=tmp_path / "old.ckpt",
        max_epochs=2)
    assert spy.values == [DEFAULT_OPTIM["lr"]] * 4 != [LR] * 4


@pytest.mark.parametrize("scheduler", [{"name": "none"}, {"name": "cosine", "warmup_steps": 2, "final_lr_ratio": 0.1}])
def test_a_resume_with_another_lr_steps_with_it(tmp_path: Path, capsys, scheduler: dict):
    """Lightning restores the saved optimizer and schedule; the resumed module puts the new lr in
    (cosine: the schedule at its step, from the new lr, over the new run length) and says so."""
    trainer = fit(tiny(scheduler=scheduler), BatchLoader(*data(32), 8), max_epochs=1)  # 4 steps
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    spy = OptimizerSpy(lambda optimizer: optimizer.param_groups[0]["lr"], "pre")
    fit(tiny(lr=LR / 10, scheduler=scheduler), BatchLoader(*data(32), 8), callbacks=[spy],
        ckpt_path=tmp_path / "epoch1.ckpt", max_epochs=2)
    expected = [LR / 10] * 4 if scheduler["name"] == "none" else [expected_cosine_lr(s, 2, 8, 0.1) / 10 for s in range(4, 8)]
    assert spy.values == pytest.approx(expected, rel=1e-9)
    assert f"now used: optim.lr={LR / 10} (was {LR})" in capsys.readouterr().out


def test_cosine_needs_a_run_length():
    module = tiny(scheduler={"name": "cosine", "warmup_steps": 0, "final_lr_ratio": 0.0})
    with pytest.raises(ValueError, match="finite run"):
        fit(module, BatchLoader(*data(16), 8), max_epochs=-1)


# --- counts in optimizer steps ---------------------------------------------------------------------
class BatchImages(L.Callback):
    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self.batches.append(batch[0].clone())


@pytest.mark.parametrize("limit, steps", [(4, 4), (0.5, 3), (100, 6)])  # of 6 batches of 8
def test_limit_train_batches_counts_optimizer_steps(limit, steps: int):
    """Lightning's limit_train_batches on the project's loader: the first `steps` batches of the same shuffled
    epoch, one optimizer step each, every epoch."""
    images, labels = data(48)
    spy = BatchImages()
    trainer = fit(tiny(), BatchLoader(images, labels, 8, shuffle=True, seed=0), callbacks=[spy], max_epochs=2,
                  limit_train_batches=limit)
    assert trainer.global_step == 2 * steps == len(spy.batches)
    unlimited = list(BatchLoader(images, labels, 8, shuffle=True, seed=0))
    assert all(torch.equal(a, b) for a, (b, _) in zip(spy.batches[:steps], unlimited))


def test_max_steps_is_exact():
    trainer = fit(tiny(), BatchLoader(*data(48), 8), max_steps=4)
    assert trainer.global_step == 4


def test_training_step_returns_its_loss():
    """Callbacks (e.g. a stop on a non-finite loss) read every optimizer step's loss from `outputs`."""
    class Outputs(L.Callback):
        shapes: list = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs["loss"]
            assert not loss.requires_grad and torch.isfinite(loss).all()
            self.shapes.append(tuple(loss.shape))

    spy = Outputs()
    fit(tiny(), BatchLoader(*data(40), 8), callbacks=[spy])
    assert spy.shapes == [()] * 5


def test_a_gated_checkpoint_from_before_the_new_defaults_is_the_first_design(tmp_path: Path):
    """Issue 28 changed model=gated's defaults (dilations, centre_input, head). A checkpoint saved before
    centre_input and head existed holds neither: it loads as the design it was trained with (a missing option
    means the network's own default, the first design's), and a config with today's defaults is refused by name."""
    hparams = {"arch": "gated", "levels": 4, "image_size": 8, "num_classes": 0, "channels": 8, "layers": 2,
               "kernel_size": 3, "input_kernel": 7, "dilations": [1], "dropout": 0.0}
    torch.manual_seed(0)
    old = GatedPixelCNN(channels=8, layers=2).eval()  # the first design: ReLU head, input level / L
    torch.save({"hyper_parameters": hparams, "state_dict": {f"net.{k}": v for k, v in old.state_dict().items()}},
               tmp_path / "old.ckpt")
    loaded = load_module(tmp_path / "old.ckpt")
    assert not loaded.net.centre_input and loaded.net.head_kind == "relu"
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded.net(x), old(x))
    first_design = {"arch": "gated", "image_size": 8, "channels": 8, "layers": 2, "dilations": [1],
                    "centre_input": False, "head": "relu"}
    today = OmegaConf.load(ROOT / "conf" / "model" / "gated.yaml").model
    for model, fits in ((first_design, True), ({**first_design, "centre_input": today.centre_input}, False),
                        ({**first_design, "head": today.head}, False)):
        config = OmegaConf.create({"model": model, "optim": {"lr": 1e-3, "scheduler": {"name": "none"}}})
        if fits:
            check_same_network(hparams, config, tmp_path / "old.ckpt", key="ckpt_path")
        else:
            with pytest.raises(UserError, match=r"holds a network with model\.(centre_input|head)=.*pass the saved"):
                check_same_network(hparams, config, tmp_path / "old.ckpt", key="ckpt_path")
