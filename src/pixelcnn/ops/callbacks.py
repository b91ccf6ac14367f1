"""A training run's Lightning callbacks (`build_callbacks`, from its config): sample grids in every logger,
a run-time estimate at start (whose timing bench.py shares), a stop as soon as the training loss is not
finite, what makes a resumed run continue exactly (random states, checkpoint paths of a moved run dir),
and the step checkpoint that a run killed or stopped by SIGTERM resumes from."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import (Checkpoint, EarlyStopping, EMAWeightAveraging, LearningRateMonitor,
                                         ModelCheckpoint, Timer, TQDMProgressBar)
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from pixelcnn.ops.checkpoints import STEP_CHECKPOINT
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.rules import as_override
from pixelcnn.ops.files import torch_save
from pixelcnn.ops.images import levels_to_grid, save_grid


class SampleGridCallback(L.Callback):
    """Every `every_n_epochs` epochs (and the last), a grid of samples in every logger (TensorBoard's images
    tab, an MLflow image artifact samples/epochNNN_T<t>.png, or a PNG in <log_dir>/samples/), drawn with a
    fixed seed: successive grids use the same random numbers, so they show how the model changes rather than
    sampling noise. Conditional models get one row per class."""

    def __init__(self, every_n_epochs: int, n: int, temperature: float, seed: int, method: str):  # the sample group
        self.every_n_epochs, self.n, self.temperature = every_n_epochs, n, temperature
        self.seed, self.method = seed, method

    def due(self, epoch: int, max_epochs: int | None, stopping: bool) -> bool:
        """Whether epoch `epoch` (1-based) gets a grid: every N epochs, and the last one."""
        last = stopping or (max_epochs is not None and max_epochs > 0 and epoch >= max_epochs)  # -1: no limit
        return self.every_n_epochs > 0 and (epoch % self.every_n_epochs == 0 or last)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not trainer.is_global_zero or not self.due(epoch, trainer.max_epochs, trainer.should_stop):
            return
        # With model.ema_decay, the weight average draws the grid, as it is what the checkpoints hold (a copy of
        # the trained module once fit has begun; Lightning has no public accessor for it).
        module = next((c._average_model.module for c in trainer.callbacks
                       if isinstance(c, WeightAverage) and c._average_model is not None), module)
        labels, nrow = None, 8
        if module.conditional:  # one row per class, as `sample.py label=all` draws them
            nrow = max(self.n // module.num_classes, 1)
            labels = torch.arange(module.num_classes).repeat_interleave(nrow)
        n = len(labels) if labels is not None else self.n
        images = module.sample(n, self.temperature, self.seed, labels, self.method)
        grid = levels_to_grid(images, module.levels, nrow=nrow, scale=4)  # (3, H, W)
        name = f"epoch{epoch:03d}_T{self.temperature:g}.png"
        for logger in trainer.loggers:  # where each keeps images (CSV and any other with a log_dir: PNGs)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"samples/T={self.temperature:g}", grid, epoch)
            elif isinstance(logger, MLFlowLogger):
                pixels = grid.permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()  # (H, W, 3) as MLflow takes it
                logger.experiment.log_image(logger.run_id, pixels, artifact_file=f"samples/{name}")
            elif getattr(logger, "log_dir", None):
                save_grid(grid, Path(logger.log_dir) / "samples" / name)


class WeightAverage(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights (`model.ema_decay`), updated after each optimizer
    step. It validates in place of the weights, and checkpoints hold it as their state_dict (the raw weights
    go under current_model_state, for a resume), so sample.py and evaluate.py use it."""

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning calls this for trainer.test(ckpt_path=...) too, where the parent would put the raw
        # weights back in place of the average that the checkpoint's state_dict holds.
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, module, checkpoint)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite: training cannot recover, so the run stops."""


class StopOnNonFiniteLoss(L.Callback):
    """Stops the run at the first NaN/inf training loss, naming the optimizer step (Lightning's
    EarlyStopping check_finite looks at a validation metric once per epoch)."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"]  # training_step's (detached; divided by accumulate_grad_batches)
        bad_here = not bool(torch.isfinite(loss))  # a host sync per batch
        # Under DDP every rank must stop together (a rank left behind would wait forever in the
        # next all-reduce): any rank's bad loss stops all. A no-op on one device.
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        where = (f"is {float(loss)} at optimizer step {trainer.global_step} "
                 f"(batch {batch_idx + 1} of epoch {trainer.current_epoch + 1})" if bad_here
                 else f"is not finite on another process by optimizer step {trainer.global_step}")
        raise NonFiniteLossError(f"the training loss {where}: training stopped; try a lower optim.lr "
                                 f"(now {module.optim['lr']:g})")


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, which redraws its line with carriage returns and ends it when its loop
    ends: a failure skips that, so the bars still drawn are closed, and the `error:` line starts its own."""

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        for bar in (self._test_progress_bar, self._val_progress_bar, self._train_progress_bar):  # innermost first
            if bar is not None:
                bar.close()


def synced_time(device: torch.device) -> float:
    """`time.perf_counter()` once `device` has done the work queued on it (a GPU, CUDA or MPS, runs asynchronously)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter()


class RunTimeEstimate(L.Callback):
    """Times `measure` training batches after `warmup` ones (which carry compilation and cuDNN autotuning),
    or fewer where the epoch ends first, and the whole epoch `timed_epoch` with its validation (with
    torch.compile train.py times the second: the first carries the compilation). Only these marks sync the
    GPU: a sync per batch would hide the CPU/GPU overlap being measured. With `report` (train.py), rank 0
    prints how long training should take on this machine as soon as the batches are timed, and again from
    the timed epoch; bench.py reads the measures (`images`, `seconds`, `epoch_seconds`)."""

    def __init__(self, timed_epoch: int = 0, preset: str | None = None, warmup: int = 4, measure: int = 10,
                 report: bool = True):
        self.timed_epoch, self.warmup, self.measure, self.report = timed_epoch, warmup, measure, report
        self.preset = preset  # the experiment preset of the run, if any
        self.batches = self.images = 0  # training batches run; images in the timed ones
        self.seconds = self.epoch_seconds = None  # of the timed batches; of the timed epoch, with its validation
        self._hinted = False
        self._epoch_start = None  # a resume may start at an epoch's end (its on_train_epoch_start ran before the save)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start = synced_time(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.batches == self.warmup:
            self._start = synced_time(module.device)
        if self.batches >= self.warmup and self.seconds is None:
            self.images += len(batch[0])

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.batches += 1
        timed = self.batches - self.warmup
        epoch_ends = batch_idx + 1 >= trainer.num_training_batches
        if self.seconds is not None or timed < 1 or (timed < self.measure and not epoch_ends):
            return
        self.seconds = synced_time(module.device) - self._start
        per_batch = self.seconds / timed
        self._report(trainer, per_batch * trainer.num_training_batches,
                     f"{per_batch * 1e3:.1f} ms/batch -> training alone takes about {{}} here")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:  # after its validation
        if trainer.current_epoch == self.timed_epoch and self._epoch_start is not None:
            self.epoch_seconds = synced_time(module.device) - self._epoch_start
            self._report(trainer, self.epoch_seconds, f"epoch {self.timed_epoch + 1} incl. validation: "
                         f"{self.epoch_seconds:.1f} s -> whole run about {{}}")

    def _report(self, trainer: L.Trainer, epoch_s: float, line: str) -> None:
        """`line` with the run time that `epoch_s` per epoch gives in place of its {}; once, for a long
        run, the CPU preset's line (`cpu_preset_hint`)."""
        if not self.report or not trainer.is_global_zero:  # one estimate, not one per rank
            return
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None  # -1: no limit
        run_time = (f"{_human(epoch_s * epochs)} for {epochs} epochs (less if early stopping or max_time ends it)"
                    if epochs else f"{_human(epoch_s)} per epoch, with no epoch limit")
        print("[pixelcnn] " + line.format(run_time), flush=True)
        limits = [epoch_s * epochs] if epochs else []
        # trainer.max_time's duration: Lightning adds its Timer only for a max_time, so the Timer has one.
        limits += [t.time_elapsed() + t.time_remaining() for t in trainer.callbacks if isinstance(t, Timer)]
        if not self._hinted and (hint := cpu_preset_hint(min(limits, default=None), torch.cuda.is_available(),
                                                         self.preset)):
            print(hint, flush=True)
            self._hinted = True


def cpu_preset_hint(run_s: float | None, has_gpu: bool, preset: str | None = None) -> str | None:
    """The line for a run estimated at over 30 min on a machine without a GPU: the seed defaults are a
    GPU job (150 epochs: ~6 h on 2 CPU cores), the CPU preset takes a few minutes. Not for a run of
    an experiment preset: it was chosen (and on a busy machine even the CPU preset can look long)."""
    if has_gpu or preset is not None or run_s is None or run_s <= 30 * 60:
        return None
    return ("[pixelcnn] no GPU here: for a first run in ~3 min on a CPU, stop this one (Ctrl-C) and use the CPU "
            "preset: python train.py experiment=quick")


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class RandomStates(L.Callback):
    """The global random states (torch, CUDA, numpy, Python), which Lightning does not save, in every
    checkpoint, put back on resume so that dropout masks (and all else drawn from them) continue as in
    an uninterrupted run: in `on_train_start`, after what only a resumed run does before training
    (building the loaders, the sanity check). numpy's state is a tensor, for `weights_only=True`."""

    _to_restore: dict | None = None  # a resumed checkpoint's states, until training starts

    def state_dict(self) -> dict:
        keys, position, has_gauss, cached_gaussian = np.random.get_state()[1:]
        states = {"torch": torch.get_rng_state(), "python": random.getstate(),
                  "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        states, self._to_restore = self._to_restore, None
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        saved = states["numpy"]
        np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"],
                             saved["cached_gaussian"]))
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


class RunDirCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for a run dir that may be moved or copied: its saved state names the
    checkpoint files by absolute path, and Lightning drops that state (best score, best k files)
    when the folder changed. Here such paths are taken from the folder the files are in now."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that checkpoints written before this class existed still resume.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict) -> None:
        old_dir = state_dict.get("dirpath")
        if old_dir and self.dirpath and old_dir != self.dirpath:

            def here(path):
                moved = isinstance(path, str) and path and Path(path).parent == Path(old_dir)
                return str(Path(self.dirpath) / Path(path).name) if moved else path

            # Every path in the old folder (best, kth best, last), then the best k's keys; no other value is one.
            state_dict = {**{key: here(value) for key, value in state_dict.items()}, "dirpath": self.dirpath,
                          "best_k_models": {here(k): v for k, v in state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)


STOPPED_EXIT_CODE = 143  # a run stopped by SIGTERM after saving: 128 + 15, what a shell reports for SIGTERM


class StepCheckpoint(Checkpoint):
    """`<dirpath>/<filename>.ckpt`, replaced each time: the run's resume point between two optimizer
    steps, written every `every_n_steps` steps (0: never) and, when the run is asked to stop (SIGTERM,
    or a SLURM job's requeue signal), at the next step boundary; the run then ends saying how it resumes.

    Never at an epoch's last batch: Lightning resumes a checkpoint saved there (before the epoch's
    validation) by skipping that validation and counting the next epoch as started, so that run's later
    checkpoints record its epoch progress one epoch behind, and resuming one replays a whole epoch
    (issue 15). Such a save is made in `on_train_epoch_end` instead, an ordinary epoch-end resume point.

    SIGTERM: Lightning's own handler only sets `trainer.received_sigterm`; its loops then stop at the
    next batch without a checkpoint (or mid-validation) and exit with status 0 (`SIGTERMException` is a
    SystemExit without a code). So while training this handler replaces it (Lightning restores the
    handlers of before `fit` when it ends), and the run exits with STOPPED_EXIT_CODE.

    SLURM requeue signals (`on_train_start` lists them): Lightning's and submitit's handlers act at once,
    mid-step (and submitit's saves no model), so they run at the next step boundary, after step.ckpt is
    saved (Lightning's then saves hpc_ckpt_N.ckpt and calls `scontrol requeue`; submitit's requeues the
    job and exits); the requeued job continues from step.ckpt (`run_dirs.requeued_job`). Under DDP the
    ranks decide together (one reduction per batch): all save the same step and stop together.

    With `trainer.accumulate_grad_batches` > 1 a batch that ends no optimizer step is no boundary: the
    gradients it accumulated are in no checkpoint, so a save there would not resume bit for bit."""

    def __init__(self, dirpath: str | Path, filename: str, every_n_steps: int | None = None):
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_steps = every_n_steps or 0
        self.signal: int | None = None  # the stop signal received (SIGTERM or a requeue signal)
        self.stopped = False  # this callback saved and stopped the run
        self._due_at_epoch_end = False
        self._step_seen = 0  # trainer.global_step at the last batch's end: it moves when a batch ends a step
        self._requeue_handlers: dict[int, Any] = {}  # requeue signal -> the handler deferred to a step boundary

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._step_seen = trainer.global_step
        if trainer.received_sigterm:  # one that came since `fit` began (Lightning's handler)
            self.signal = signal.SIGTERM
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            return
        # The signals that ask this SLURM job to save and requeue: that of Lightning's SLURMEnvironment (SIGUSR1
        # unless configured otherwise; set when Lightning detects a job started by srun), read where Lightning's own
        # _SignalConnector reads it, and that of submitit when this is a job of hydra/launcher=slurm (SIGUSR2, or
        # SUBMITIT_PREEMPT_SIGNAL), which its sbatch script asks SLURM to send before the time limit (--signal).
        requeue_signals = []
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
            requeue_signals.append(environment.requeue_signal)
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            from submitit import JobEnvironment

            requeue_signals.append(getattr(signal, "SIG" + JobEnvironment.USR_SIG))
        for signum in requeue_signals:
            if callable(handler := signal.getsignal(signum)):
                self._requeue_handlers[signum] = handler
                signal.signal(signum, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, signum: int, frame) -> None:
        if self.signal not in self._requeue_handlers:  # the SIGTERM that SLURM sends a requeued job keeps the requeue
            self.signal = signum

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        # Any rank's signal; on every batch: under DDP each rank takes part in the reduction.
        stop = trainer.strategy.reduce_boolean_decision(self.signal is not None, all=False)
        stepped, self._step_seen = trainer.global_step != self._step_seen, trainer.global_step
        due = stop or (self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0)
        if not due or not stepped or trainer.fast_dev_run:
            return
        # The epoch's last batch saves at the epoch's end: see the class doc.
        self._due_at_epoch_end = batch_idx + 1 >= trainer.num_training_batches
        if not self._due_at_epoch_end:
            self._save(trainer, stop)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Also a signal during the epoch's last batch or its validation.
        stop = trainer.strategy.reduce_boolean_decision(self.signal is not None, all=False)
        if (self._due_at_epoch_end or stop) and not trainer.fast_dev_run:
            self._due_at_epoch_end = False
            self._save(trainer, stop)

    def _save(self, trainer: L.Trainer, stop: bool) -> None:
        trainer.save_checkpoint(self.path)
        if not stop:
            return
        self.stopped = True
        requeue = self._requeue_handlers.get(self.signal)
        if trainer.is_global_zero:
            name = signal.Signals(self.signal).name if self.signal else "another process's signal"
            resume = f"python train.py {as_override('ckpt_path', self.path.parent.parent)}"  # pastes as printed
            then = (f"the requeued job continues from it (if not requeued: {resume})" if requeue
                    else f"resume with: {resume}")
            print(f"[pixelcnn] stopped by {name}{' (SLURM requeue)' * bool(requeue)} at optimizer step "
                  f"{trainer.global_step}: saved {self.path}; {then}", flush=True)
        if requeue:
            # Lightning's handler saves one more hpc_ckpt_<N>.ckpt at each requeue, unused (this step.ckpt is
            # the resume point): the run's older ones are removed.
            older = list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")) if trainer.is_global_zero else []
            requeue(self.signal, None)  # requeues the job (submitit's also exits here, non-zero)
            for path in older:
                path.unlink(missing_ok=True)
        # Lightning's own exception for this stop (it ends `fit` as an interruption); the train
        # command turns it into exit status STOPPED_EXIT_CODE.
        raise SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each checkpoint with `torch_save` (whole or not at all: see
    `pixelcnn.ops.files`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        torch_save(checkpoint, path)


def build_callbacks(cfg: DictConfig, output_dir: Path, speed) -> list[L.Callback]:
    """The callbacks of a training run, as its config (and `speed`, `resources.resolve_speed`'s choices) asks."""
    # The experiment preset this run was composed with (None outside a Hydra app).
    preset = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    callbacks: list[L.Callback] = [
        RunDirCheckpoint(  # first: `trainer.checkpoint_callback` is this one
            dirpath=output_dir / "checkpoints", filename="best-epoch{epoch:03d}-val_bpd{val/bpd:.4f}",
            monitor="val/bpd", mode="min", save_last=True, auto_insert_metric_name=False,
        ),
        RandomStates(),
        SampleGridCallback(**cfg.sample),
        RunTimeEstimate(timed_epoch=1 if speed.compile else 0, preset=preset),
        StopOnNonFiniteLoss(),
    ]
    if cfg.model.ema_decay:
        callbacks.append(WeightAverage(decay=cfg.model.ema_decay, device="cuda" if speed.cuda else "cpu"))
    if cfg.trainer.enable_progress_bar:
        # Each refresh reads the logged loss back from the GPU (a sync), so not every batch.
        callbacks.append(ProgressBar(refresh_rate=cfg.progress_bar_refresh))
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val/bpd", mode="min", patience=cfg.early_stopping_patience))
    # A constant lr is not worth a GPU read-back every log_every_n_steps; without a logger, Lightning refuses it.
    if cfg.optim.scheduler.name != "none" and cfg.get("logger"):
        callbacks.append(LearningRateMonitor())  # as the scheduler steps: per log_every_n_steps, or per epoch
    # checkpoints/step.ckpt, replaced each time: a resume point mid-epoch, every N steps and on SIGTERM
    callbacks.append(StepCheckpoint(output_dir / "checkpoints", STEP_CHECKPOINT, cfg.checkpoint_every_n_steps))
    return callbacks
