"""`train(cfg)`: build data, model and trainer from a composed config, fit, test, return metrics.

Everything a run produces goes into `cfg.output_dir`: TensorBoard logs (`tb/`), checkpoints
(`checkpoints/best-*.ckpt` by val bits/dim and `last.ckpt`), `metrics.json`, and (written by
Hydra) the resolved config in `.hydra/`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from pixelcnn.callbacks import RandomStates, RunDirCheckpoint, RunTimeEstimate, SampleGridCallback
from pixelcnn.checkpoints import STEP_CHECKPOINT, check_resume, read_checkpoint, resolve_checkpoint
from pixelcnn.config import UserError, validate

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


def build_module(cfg: DictConfig, speed: SpeedChoices) -> L.LightningModule:
    """The configured LightningModule with the speed choices applied."""
    module = instantiate(cfg.model, _convert_="all")  # plain lists in hparams: checkpoints load with weights_only
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
    ]
    if cfg.trainer.enable_progress_bar:
        # Each refresh reads the logged loss back from the GPU (a sync), so not every batch.
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_bar_refresh))
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val/bpd", mode="min", patience=cfg.early_stopping_patience))
    if cfg.checkpoint_every_n_steps:  # checkpoints/step.ckpt, replaced each time: a resume point mid-epoch
        callbacks.append(RunDirCheckpoint(dirpath=output_dir / "checkpoints", filename=STEP_CHECKPOINT,
                                          every_n_train_steps=cfg.checkpoint_every_n_steps, save_top_k=1,
                                          enable_version_counter=False))
    return callbacks


def check_step_checkpoints(cfg: DictConfig, speed: SpeedChoices) -> None:
    """checkpoint_every_n_steps must be a multiple of the optimizer steps per Lightning batch, as
    checkpoints are written between batches. `validate` checks an explicit data.steps_per_batch;
    auto is known here: 8 when the data sits on the GPU (FashionMNISTDataModule.loader), else 1."""
    every, steps = cfg.checkpoint_every_n_steps, cfg.data.steps_per_batch
    if every and steps == "auto" and speed.cuda and cfg.data.on_device in ("auto", True) and every % 8:
        raise UserError(f"checkpoint_every_n_steps={every} is invalid here: data.steps_per_batch=auto takes 8 "
                        "optimizer steps per batch on CUDA, so it must be a multiple of 8")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test the configured model; returns {"val_bpd": best, "test_bpd": ..., ...}."""
    validate(cfg)
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

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    datamodule.prepare_data()  # fails here, before any training output, if the data is missing or corrupt
    datamodule.setup()  # likewise for a split that does not fit (data.val_size); Lightning's call is then a no-op
    speed = resolve_speed(cfg.speed, cfg.trainer.accelerator)
    check_step_checkpoints(cfg, speed)
    module = build_module(cfg, speed)

    logger = TensorBoardLogger(save_dir=str(output_dir), name="tb", version="", default_hp_metric=False)
    trainer: L.Trainer = instantiate(cfg.trainer, precision=speed.precision, logger=logger,
                                     callbacks=build_callbacks(cfg, output_dir, speed), default_root_dir=str(output_dir))
    n_params = sum(p.numel() for p in module.parameters())
    print(f"[pixelcnn] run dir: {output_dir.resolve()}\n"
          f"[pixelcnn] {cfg.model.arch}: {n_params:,} parameters; {speed}; "
          f"TensorBoard: tensorboard --logdir {output_dir / 'tb'}", flush=True)

    started = time.perf_counter()
    # weights_only: no file, ours or not, is unpickled with code (read_checkpoint has checked it already).
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
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
    if cfg.quality_n:
        metrics.update(end_of_run_quality(cfg, module, datamodule, speed))
        logger.log_metrics({f"quality/{k}": v for k, v in metrics.items() if k in QUALITY_KEYS}, trainer.global_step)
    logger.log_hyperparams(_flat_hparams(cfg), {f"hparams/{k}": v for k, v in metrics.items()
                                                if k in ("val_bpd", "test_bpd", *QUALITY_KEYS)})
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
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
            "seed": cfg.seed, "max_epochs": cfg.trainer.max_epochs}
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
