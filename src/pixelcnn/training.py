"""`train(cfg)`: build data, model and trainer from a composed config, fit, test, return metrics.

Everything a run produces goes into `cfg.output_dir`: TensorBoard logs (`tb/`), checkpoints
(`checkpoints/best-*.ckpt` by val bits/dim and `last.ckpt`), `metrics.json`, and (written by
Hydra) the resolved config in `.hydra/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from pixelcnn.callbacks import RandomStates, RunDirCheckpoint, RunTimeEstimate, SampleGridCallback, StopOnNonFiniteLoss
from pixelcnn.checkpoints import STEP_CHECKPOINT, check_resume, read_checkpoint, resolve_checkpoint
from pixelcnn.config import WRITE_ERRNOS, UserError, validate
from pixelcnn.data import CUDA_STEPS_PER_BATCH
from pixelcnn.files import AtomicCheckpointIO
from pixelcnn.resources import check_training_fits, claim_job_resources, cuda_device_args, training_footprint
from pixelcnn.sweep import write_metrics

log = logging.getLogger(__name__)


@dataclass
class SpeedChoices:
    cuda: bool
    compile: bool
    precision: str
    channels_last: bool


def resolve_speed(speed: DictConfig, accelerator: str) -> SpeedChoices:
    """Turn the `auto` values of the speed group into concrete choices for the device in use."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} but no CUDA device is available: use "
                        "trainer.accelerator=auto (or cpu)")
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")

    def pick(value, on_cuda, otherwise):
        return (on_cuda if cuda else otherwise) if value == "auto" else value

    bf16 = cuda and torch.cuda.is_bf16_supported()
    return SpeedChoices(
        cuda=cuda,
        compile=bool(pick(speed.compile, True, False)),
        precision=str(pick(speed.precision, "bf16-mixed" if bf16 else "32-true", "32-true")),
        channels_last=bool(pick(speed.channels_last, True, False)),
    )


# Trainer arguments the module applies itself: Lightning refuses them under manual optimization
# (several optimizer steps per Lightning batch), so the Trainer gets its defaults instead.
MODULE_TRAINER_KEYS = {"gradient_clip_val": None, "gradient_clip_algorithm": None, "accumulate_grad_batches": 1}


def build_module(cfg: DictConfig, speed: SpeedChoices) -> L.LightningModule:
    """The configured LightningModule with the speed choices and the trainer's clipping and
    accumulation settings applied."""
    knobs = {key: cfg.trainer[key] for key in MODULE_TRAINER_KEYS}
    # _convert_: plain lists and dicts in hparams, so checkpoints load with weights_only.
    module = instantiate(cfg.model, _convert_="all", **knobs)
    if speed.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if speed.compile:
        module.compile_loss(mode=cfg.speed.compile_mode, dynamic=False)
    return module


def build_callbacks(cfg: DictConfig, output_dir: Path, speed: SpeedChoices) -> list[L.Callback]:
    callbacks: list[L.Callback] = [
        RunDirCheckpoint(  # first: `trainer.checkpoint_callback` is this one
            dirpath=output_dir / "checkpoints", filename="best-epoch{epoch:03d}-val_bpd{val/bpd:.4f}",
            monitor="val/bpd", mode="min", save_last=True, auto_insert_metric_name=False,
        ),
        RandomStates(),
        SampleGridCallback(cfg.sample.every_n_epochs, cfg.sample.n, cfg.sample.temperature, cfg.sample.seed,
                           cfg.sample.method),
        RunTimeEstimate(timed_epoch=1 if speed.compile else 0),
        StopOnNonFiniteLoss(),
    ]
    if cfg.trainer.enable_progress_bar:
        # Each refresh reads the logged loss back from the GPU (a sync), so not every batch.
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_bar_refresh))
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val/bpd", mode="min", patience=cfg.early_stopping_patience))
    if cfg.model.scheduler.name != "none":  # a constant lr is not worth a GPU read-back every log_every_n_steps
        callbacks.append(LearningRateMonitor())  # as the scheduler steps: per log_every_n_steps, or per epoch
    if cfg.checkpoint_every_n_steps:  # checkpoints/step.ckpt, replaced each time: a resume point mid-epoch
        callbacks.append(RunDirCheckpoint(dirpath=output_dir / "checkpoints", filename=STEP_CHECKPOINT,
                                          every_n_train_steps=cfg.checkpoint_every_n_steps, save_top_k=1,
                                          enable_version_counter=False))
    return callbacks


def secondary_rank() -> bool:
    """True in a DDP process other than global rank 0, told by the environment that started it
    (so known before Lightning sets up): LOCAL_RANK (the processes Lightning itself starts),
    RANK (torchrun), SLURM_PROCID (srun), NODE_RANK (the other machines)."""
    return any(os.environ.get(key, "0") != "0" for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


def build_trainer(cfg: DictConfig, speed: SpeedChoices, logger: TensorBoardLogger, callbacks: list[L.Callback],
                  output_dir: Path, device_args: dict) -> L.Trainer:
    """The configured Trainer (`device_args`: a parallel sweep job's GPU); devices it cannot have,
    or DDP where its processes cannot be started, are a UserError (one line)."""
    try:
        # limit_train_batches is the data module's (it counts optimizer steps), clipping and accumulation the module's.
        # Checkpoints are written whole or not at all (`AtomicCheckpointIO`).
        trainer: L.Trainer = instantiate(cfg.trainer, precision=speed.precision, logger=logger, callbacks=callbacks,
                                         default_root_dir=str(output_dir), limit_train_batches=None,
                                         plugins=[AtomicCheckpointIO()],
                                         **MODULE_TRAINER_KEYS, **device_args)
    except InstantiationException as err:  # e.g. "You requested gpu: [0, 1] But your machine only has: [0]"
        # Lightning's checks of devices / accelerator / strategy raise these (the keys are Hydra-checked).
        if isinstance(err.__cause__, (MisconfigurationException, ValueError, TypeError)):
            raise UserError("trainer.devices / accelerator / num_nodes / strategy do not fit this machine: "
                            + " ".join(str(err.__cause__).split())) from None
        raise
    environment = getattr(trainer.strategy, "cluster_environment", None)
    launched_here = environment is not None and not environment.creates_processes_externally
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if trainer.num_devices * trainer.num_nodes > 1 and launched_here and multirun:
        # Lightning would start the other ranks by re-running the command line, i.e. the whole sweep.
        raise UserError("trainer.devices > 1 in a sweep (-m) needs processes started by SLURM: use "
                        "hydra/launcher=slurm with hydra.launcher.tasks_per_node=<devices>, or run each "
                        "configuration without -m")
    return trainer


def check_step_checkpoints(cfg: DictConfig, speed: SpeedChoices) -> None:
    """checkpoint_every_n_steps must be a multiple of the optimizer steps per Lightning batch, as
    checkpoints are written between batches. `validate` checks an explicit data.steps_per_batch;
    auto is known here: CUDA_STEPS_PER_BATCH when the data sits on the GPU, else 1."""
    every, steps = cfg.checkpoint_every_n_steps, cfg.data.steps_per_batch
    on_cuda = speed.cuda and cfg.data.on_device in ("auto", True)  # where FashionMNISTDataModule puts the data
    if every and steps == "auto" and on_cuda and every % CUDA_STEPS_PER_BATCH:
        raise UserError(f"checkpoint_every_n_steps={every} is invalid here: data.steps_per_batch=auto takes {CUDA_STEPS_PER_BATCH} "
                        f"optimizer steps per batch on CUDA, so it must be a multiple of {CUDA_STEPS_PER_BATCH}")


def check_model_fits(cfg: DictConfig, speed: SpeedChoices, net: torch.nn.Module, trainer: L.Trainer,
                     datamodule) -> None:
    """Refuse a model too large for the trainer's device, or too slow for an epoch to end
    (`resources.check_training_fits`), from `net` built on the meta device (no memory)."""
    images = len(datamodule.train_set[0]) // trainer.world_size  # one device's share
    batch_size = max(1, min(cfg.data.batch_size, images))  # the largest batch it takes
    footprint = training_footprint(net, batch_size, cfg.data.image_size, cfg.model.num_classes > 0,
                                   activation_bytes=4 if speed.precision == "32-true" else 2)
    batches = math.ceil(images / batch_size)
    limit = cfg.trainer.limit_train_batches
    if limit is not None:  # Lightning's meaning: a fraction, or a number of batches
        batches = int(batches * limit) if isinstance(limit, float) else min(batches, limit)
    if cfg.trainer.max_steps > 0:
        batches = min(batches, cfg.trainer.max_steps)
    size_keys = " or ".join(f"model.{key}" for key in ("filters", "residual_blocks", "channels", "layers")
                            if key in cfg.model)
    check_training_fits(footprint, trainer.strategy.root_device, batches * batch_size, batch_size, size_keys)


def quiet_write_errors(args: threading.ExceptHookArgs) -> None:
    """`threading.excepthook`: TensorBoard's writer thread raises its failed write (e.g. a full disk)
    again in the main thread, which reports it in one line (`config.user_errors_unwrapped`), so the
    thread's own traceback is left out; any other thread error is printed as usual."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRNOS):
        threading.__excepthook__(args)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test the configured model; returns {"val_bpd": best, "test_bpd": ..., ...}."""
    validate(cfg)
    # Threads (and GPU) of a job that shares the machine with others: before any torch work.
    resources = claim_job_resources(cfg.trainer.accelerator, cfg.trainer.devices)
    output_dir = Path(cfg.output_dir)
    ckpt_path, resumed_step = None, 0
    if cfg.ckpt_path:  # resume: the latest checkpoint, which must hold the network this config builds
        ckpt_path = resolve_checkpoint(cfg.ckpt_path, prefer="last", key="ckpt_path")
        resumed = read_checkpoint(ckpt_path, key="ckpt_path")
        check_resume(resumed, cfg.model, ckpt_path)
        resumed_step = resumed.get("global_step", 0)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Lightning warns at each every-N-steps save under manual optimization that the weights are
    # those after the step: that is what a resume needs (they match the saved global step).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    torch.set_float32_matmul_precision(cfg.speed.matmul_precision)

    # limit_train_batches counts batches of data.batch_size (optimizer steps), which the loader
    # cuts; Lightning's own limit would count its batches, each of data.steps_per_batch of them.
    datamodule: L.LightningDataModule = instantiate(cfg.data, limit_train_batches=cfg.trainer.limit_train_batches)
    datamodule.prepare_data()  # fails here, before any training output, if the data is missing or corrupt
    datamodule.setup()  # likewise for a split that does not fit (data.val_size); Lightning's call is then a no-op
    speed = resolve_speed(cfg.speed, cfg.trainer.accelerator)
    check_step_checkpoints(cfg, speed)
    with torch.device("meta"):  # the model's own option checks, before Lightning prints; no memory
        meta_net = instantiate(cfg.model, _convert_="all").net

    logger = TensorBoardLogger(save_dir=str(output_dir), name="tb", version="", default_hp_metric=False)
    trainer = build_trainer(cfg, speed, logger, build_callbacks(cfg, output_dir, speed), output_dir,
                            cuda_device_args(resources) if speed.cuda else {})
    check_model_fits(cfg, speed, meta_net, trainer, datamodule)  # before the model takes any memory
    module = build_module(cfg, speed)
    n_params = sum(p.numel() for p in module.parameters())
    if not secondary_rank():  # each DDP process runs this; the ranks are not set up yet
        print(f"[pixelcnn] run dir: {output_dir.resolve()}\n[pixelcnn] {cfg.model.arch}: {n_params:,} parameters; "
              f"{speed}; TensorBoard: tensorboard --logdir {output_dir / 'tb'}", flush=True)

    threading.excepthook = quiet_write_errors
    started = time.perf_counter()
    try:
        # weights_only: no file, ours or not, is unpickled with code (read_checkpoint has checked it already).
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Exception:
        # A failed run (e.g. a non-finite loss) still shows in TensorBoard's HPARAMS tab, marked failed,
        # unless its disk is full; the writer is closed (its thread done) before the run dir may be removed.
        with suppress(OSError):
            logger.log_hyperparams(_flat_hparams(cfg), {"hparams/failed": 1.0})
        with suppress(OSError):
            logger.finalize("failed")
        raise
    fit_seconds = time.perf_counter() - started
    checkpoint = trainer.checkpoint_callback
    if ckpt_path is not None and trainer.global_step == resumed_step and (output_dir / "metrics.json").is_file():
        # e.g. stopped by max_time, or early stopping: resuming trains nothing, so the results stand.
        print(f"[pixelcnn] {output_dir} has already finished (nothing left to train at step {resumed_step}): its "
              "metrics.json is unchanged", flush=True)
        return json.loads((output_dir / "metrics.json").read_text())
    test = trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path or None, verbose=False,
                        weights_only=True)
    metrics = {
        "val_bpd": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan"),
        "test_bpd": float(test[0]["test/bpd"]),
        "epochs": trainer.current_epoch,
        "parameters": n_params,
        "fit_seconds": round(fit_seconds, 1),
        "best_checkpoint": checkpoint.best_model_path,
    }
    if not trainer.is_global_zero:  # the other DDP ranks: rank 0 scores samples and writes the results
        return metrics
    if cfg.quality_n:
        metrics.update(end_of_run_quality(cfg, module, datamodule, speed))
        logger.log_metrics({f"quality/{k}": v for k, v in metrics.items() if k in QUALITY_KEYS}, trainer.global_step)
    # TensorBoard's HPARAMS tab: this run's hyperparameters with its final metrics (finite ones only).
    logger.log_hyperparams(_flat_hparams(cfg), {f"hparams/{k}": v for k, v in metrics.items()
                                                if k in ("val_bpd", "test_bpd", *QUALITY_KEYS) and math.isfinite(v)})
    write_metrics(output_dir / "metrics.json", metrics)
    print(f"[pixelcnn] best val {metrics['val_bpd']:.4f} bits/dim, test {metrics['test_bpd']:.4f} bits/dim, "
          f"{trainer.current_epoch} epochs in {fit_seconds / 60:.1f} min ({checkpoint.best_model_path})", flush=True)
    return metrics


QUALITY_KEYS = ("frechet_distance", "frechet_distance_floor", "class_accuracy")


def end_of_run_quality(cfg: DictConfig, module, datamodule, speed: SpeedChoices) -> dict[str, float]:
    """Sample quality of the best checkpoint (which `trainer.test` has just loaded)."""
    from pixelcnn.classifier import quality_metrics

    module = module.to("cuda" if speed.cuda else "cpu")  # Lightning leaves it on the CPU after test
    quality = quality_metrics(module, datamodule, n=cfg.quality_n, temperature=cfg.sample.temperature,
                              seed=cfg.sample.seed)
    print("[pixelcnn] sample quality: " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items()), flush=True)
    return quality


def _flat_hparams(cfg: DictConfig) -> dict[str, object]:
    """The hyperparameters worth comparing in TensorBoard's HPARAMS tab, flattened to scalars."""
    keep = {"model": OmegaConf.to_container(cfg.model, resolve=True), "data": OmegaConf.to_container(cfg.data, resolve=True),
            "seed": cfg.seed, "max_epochs": cfg.trainer.max_epochs,
            "trainer": {key: cfg.trainer[key] for key in MODULE_TRAINER_KEYS}}
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if not k.startswith("_"):
                    walk(f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}", v)
        else:
            flat[prefix.rstrip(".")] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", keep)
    return flat
