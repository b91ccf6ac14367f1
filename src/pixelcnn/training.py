"""`train(cfg)`: build data, model and trainer from a composed config, fit, test, return metrics.

Everything a run produces goes into `cfg.output_dir`: the chosen loggers' files (conf/logger/:
TensorBoard's `tb/` by default, `csv/`, MLflow's `mlflow.db` + `mlartifacts/`), checkpoints
(`checkpoints/best-*.ckpt` by val bits/dim, `last.ckpt`, and `step.ckpt` every
checkpoint_every_n_steps and on SIGTERM, after which the run exits 143), `metrics.json`, and
(written by Hydra) the resolved config in `.hydra/`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
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
from lightning.fabric.utilities.logger import _flatten_dict, _sanitize_params
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from pixelcnn.ops import (STEP_CHECKPOINT, STOPPED_EXIT_CODE, WRITE_ERRNOS, as_override, AtomicCheckpointIO, check_sqlite,
                          check_training_fits, claim_job_resources, cuda_device_args, ProgressBar, RandomStates, read_checkpoint,
                          read_same_network, run_dir_of, RunDirCheckpoint, RunTimeEstimate, SampleGridCallback, secondary_rank,
                          StepCheckpoint, StopOnNonFiniteLoss, training_footprint, UserError, validate, WeightAverage, write_run_metrics)
from pixelcnn.quality import quality_metrics, unscorable
from pixelcnn.data import changed_splits, limited
from pixelcnn.module import run_steps

log = logging.getLogger(__name__)


@dataclass
class SpeedChoices:
    cuda: bool
    compile: bool
    precision: str
    channels_last: bool


# speed.compile=auto on a CPU: compile the loss only for runs of at least this many optimizer steps.
# Measured on the 2-core EPYC (AVX-512 BF16), seed model, batch 128, bf16 autocast: the first compiled
# step takes ~50 s, and a run compiles about 3 graphs (the training batch, the epoch's shorter last
# batch, the evaluation batch), ~150 s; then a step takes ~0.144 s instead of ~0.170 s (890 vs 755
# img/s, issue 18), saving ~0.026 s, so compiling pays off after ~6,000 steps. Twice that, 12,000
# (28 epochs of 128), leaves a margin: the seed run (64,500 steps) compiles, experiment=quick (4,300) not.
CPU_COMPILE_MIN_STEPS = 12_000


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), as torch's CPUID probes
    report it; elsewhere bf16 autocast is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's (private, so looked up)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def epoch_batches(cfg: DictConfig, train_images: int, batch_size: int) -> int:
    """Batches of `batch_size` in one training epoch of `train_images`, after overfit_batches or
    limit_train_batches (Lightning's meaning: a fraction, or a number of batches)."""
    return limited(math.ceil(train_images / batch_size),
                   cfg.trainer.get("overfit_batches") or cfg.trainer.limit_train_batches)


def planned_steps(cfg: DictConfig, train_images: int) -> float:
    """Optimizer steps the configured run will take at most, before its trainer exists (`module.run_steps`
    of `epoch_batches`; the module counts its schedule's steps again from the trainer's own counts)."""
    if fast_dev_run := cfg.trainer.get("fast_dev_run"):  # true: 1 batch; an int: that many
        return int(fast_dev_run)
    return run_steps(epoch_batches(cfg, train_images, cfg.data.batch_size), cfg.trainer.max_epochs, cfg.trainer.max_steps)


def resolve_speed(cfg: DictConfig, train_steps: float = math.inf) -> SpeedChoices:
    """Turn the `auto` values of the speed group and of trainer.precision into concrete choices for
    the device in use and a run of `train_steps` optimizer steps (any other precision is Lightning's)."""
    accelerator, speed = cfg.trainer.accelerator, cfg.speed
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} but no CUDA device is available: use "
                        "trainer.accelerator=auto (or cpu)")
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    # bf16 autocast where the device computes bf16 natively (emulated, it would be slower than fp32).
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if bf16 else "32-true"
    # Compiling pays off on CUDA at once; on a CPU only with bf16 autocast (where it was measured) in a long run.
    compile_auto = cuda or (precision == "bf16-mixed" and train_steps >= CPU_COMPILE_MIN_STEPS)
    return SpeedChoices(
        cuda=cuda,
        compile=bool(compile_auto if speed.compile == "auto" else speed.compile),
        precision=str(precision),
        channels_last=bool(cuda if speed.channels_last == "auto" else speed.channels_last),
    )


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    return instantiate(cfg.data)


def resolve_num_classes(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """model.num_classes=auto becomes the loaded data's class count, so that everything after (the model,
    its footprint, the logged hparams) sees a number; the saved Hydra config keeps `auto`."""
    if cfg.model.num_classes == "auto":
        if not datamodule.num_classes:
            raise UserError(f"model.num_classes=auto but the data ({datamodule.source}) has no classes: use model."
                            "num_classes=0 (unconditional), or give the images classes (one sub-folder each, docs/data.md)")
        cfg.model.num_classes = datamodule.num_classes
        # A resume's network check took auto for the checkpoint's count (checkpoints.check_same_network).
        saved = read_checkpoint(Path(cfg.ckpt_path), "ckpt_path")["hyper_parameters"] if cfg.get("ckpt_path") else {}
        if saved and saved.get("num_classes") != datamodule.num_classes:
            raise UserError(f"ckpt_path={cfg.ckpt_path} holds a network for {saved.get('num_classes')} classes, but "
                            f"the data ({datamodule.source}) has {datamodule.num_classes} (model.num_classes=auto): "
                            "resume on the data it was trained on, or train a new network from scratch")


def check_same_data(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """A resume (ckpt_path, a requeued job) continues on the data it trained on: the fingerprints of the splits
    (`data.fingerprint`) against those its checkpoint holds (none in older checkpoints: not checked)."""
    if not cfg.get("ckpt_path"):
        return
    saved = read_checkpoint(Path(cfg.ckpt_path), "ckpt_path")["hyper_parameters"].get("data")
    if change := changed_splits(saved.get("splits") if isinstance(saved, dict) else None, datamodule.fingerprints):
        run = run_dir_of(cfg.ckpt_path) or cfg.ckpt_path
        raise UserError(f"ckpt_path={cfg.ckpt_path} was trained on other data than the {datamodule.source} data now "
                        f"(changed: {change}): resume on the data it was trained on, or start a new run on this data "
                        f"from its weights with {as_override('init_from', run)}")


def data_hparams(num_classes: int, datamodule: L.LightningDataModule) -> dict:
    """What the model takes from the data (saved with it): the class names and the source. A
    conditional model (model.num_classes > 0) must have as many classes as the data."""
    if num_classes and num_classes != datamodule.num_classes:
        found = (f"{datamodule.num_classes} classes ({', '.join(datamodule.class_names[:4])}"
                 f"{', ...' if datamodule.num_classes > 4 else ''})" if datamodule.num_classes else "no classes")
        fix = f"model.num_classes={datamodule.num_classes} or 0" if datamodule.num_classes else "model.num_classes=0"
        raise UserError(f"model.num_classes={num_classes} but the data ({datamodule.source}) has {found}: use {fix}")
    return {"class_names": list(datamodule.class_names) if num_classes else None,
            "data": {**datamodule.source_settings(), "splits": datamodule.fingerprints}}


def build_module(cfg: DictConfig, speed: SpeedChoices, datamodule: L.LightningDataModule) -> L.LightningModule:
    """The configured LightningModule for `datamodule`'s data (`data_hparams`), with the optim group and the
    speed choices; `init_from`'s weights if given."""
    # _convert_: plain lists and dicts in hparams, so checkpoints load with weights_only.
    module = instantiate(cfg.model, _convert_="all", optim=cfg.optim, **data_hparams(cfg.model.num_classes, datamodule))
    if cfg.init_from:  # fine-tuning: these weights, a fresh optimizer (the run starts at step 0)
        path, checkpoint = read_same_network(cfg.init_from, cfg, "init_from", prefer="best")
        module.load_state_dict(checkpoint["state_dict"])
        if not secondary_rank():
            print(f"[pixelcnn] init_from: the weights of {path} (step {checkpoint.get('global_step', '?')}), "
                  "a fresh optimizer", flush=True)
    if speed.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if speed.compile:
        module.compile_loss(mode=cfg.speed.compile_mode, dynamic=False)
    return module


def build_callbacks(cfg: DictConfig, output_dir: Path, speed: SpeedChoices) -> list[L.Callback]:
    # The experiment preset this run was composed with (None outside a Hydra app).
    preset = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    callbacks: list[L.Callback] = [
        RunDirCheckpoint(  # first: `trainer.checkpoint_callback` is this one
            dirpath=output_dir / "checkpoints", filename="best-epoch{epoch:03d}-val_bpd{val/bpd:.4f}",
            monitor="val/bpd", mode="min", save_last=True, auto_insert_metric_name=False,
        ),
        RandomStates(),
        SampleGridCallback(cfg.sample.every_n_epochs, cfg.sample.n, cfg.sample.temperature, cfg.sample.seed,
                           cfg.sample.method),
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


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    """The loggers the `logger` group chose (each option of conf/logger/ holds named loggers, so
    logger=[tensorboard,mlflow] gives both; ~logger none); a missing package is one error line."""
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if (uri := str(logger_cfg.get("tracking_uri"))).startswith("sqlite:///"):  # before MLflow opens it
            check_sqlite(uri.removeprefix("sqlite:///"), f"logger.{name}.tracking_uri")
        try:
            loggers.append(instantiate(logger_cfg))
        except InstantiationException as err:
            if isinstance(err.__cause__, ModuleNotFoundError):  # Lightning's check of an optional package
                # Only mlflow is optional among conf/logger/'s loggers; its extra has the logger's name.
                raise UserError(f"logger={name} needs the {name} package, which is not installed: "
                                f"pip install -e '.[{name}]' (or pip install {name})") from None
            raise
    return loggers


def log_results(loggers: list[Logger], cfg: DictConfig, metrics: dict[str, float], step: int) -> None:
    """This run's hyperparameters worth comparing (flattened to scalars as Lightning's loggers do, "." between
    levels, no Hydra `_key_`) with its final `metrics` (hparams/*), in every logger: TensorBoard takes them
    together (its HPARAMS tab), the others (CSV, MLflow) the hyperparameters as such and the metrics as metrics."""
    keep = {"model": OmegaConf.to_container(cfg.model, resolve=True), "optim": OmegaConf.to_container(cfg.optim),
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "seed": cfg.seed, "max_epochs": cfg.trainer.max_epochs,
            "trainer": {key: cfg.trainer[key] for key in ("gradient_clip_val", "gradient_clip_algorithm",
                                                          "accumulate_grad_batches")}}
    flat = _sanitize_params(_flatten_dict(keep, delimiter="."))
    params = {key: value for key, value in flat.items() if not any(part.startswith("_") for part in key.split("."))}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics)
        else:
            logger.log_hyperparams(params)
            if metrics:
                logger.log_metrics(metrics, step)
        logger.save()


def build_trainer(cfg: DictConfig, speed: SpeedChoices, loggers: list[Logger], callbacks: list[L.Callback],
                  output_dir: Path, device_args: dict) -> L.Trainer:
    """The configured Trainer (`device_args`: a parallel sweep job's GPU); devices it cannot have,
    or DDP where its processes cannot be started, are a UserError (one line)."""
    try:
        # Checkpoints are written whole or not at all (`AtomicCheckpointIO`).
        trainer: L.Trainer = instantiate(cfg.trainer, precision=speed.precision, logger=loggers or False,
                                         callbacks=callbacks, default_root_dir=str(output_dir),
                                         plugins=[AtomicCheckpointIO()], **device_args)
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


def check_model_fits(cfg: DictConfig, speed: SpeedChoices, net: torch.nn.Module, trainer: L.Trainer,
                     datamodule) -> None:
    """Refuse a model too large for the trainer's device, or too slow for an epoch to end
    (`resources.check_training_fits`), from `net` built on the meta device (no memory)."""
    images = len(datamodule.train_set[0]) // trainer.world_size  # one device's share
    batch_size = max(1, min(cfg.data.batch_size, images))  # the largest batch it takes
    footprint = training_footprint(net, batch_size, cfg.data.image_size, cfg.model.num_classes > 0, cfg.data.channels,
                                   activation_bytes=4 if speed.precision == "32-true" else 2)
    batches = run_steps(epoch_batches(cfg, images, batch_size), 1, cfg.trainer.max_steps)  # one epoch's, <= max_steps
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
    validate(cfg, "train")
    # Threads (and GPU) of a job that shares the machine with others: before any torch work.
    resources = claim_job_resources(cfg.trainer.accelerator, cfg.trainer.devices)
    output_dir = Path(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.speed.matmul_precision)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()  # fails here, before any training output, if the data is missing or corrupt
    datamodule.setup()  # likewise for a split that does not fit (data.val_size); Lightning's call is then a no-op
    resolve_num_classes(cfg, datamodule)
    check_same_data(cfg, datamodule)
    speed = resolve_speed(cfg, planned_steps(cfg, len(datamodule.train_set[0])))
    with torch.device("meta"):  # the model's own option checks, before Lightning prints; no memory
        meta_net = instantiate(cfg.model, _convert_="all").net

    loggers = build_loggers(cfg, output_dir)
    trainer = build_trainer(cfg, speed, loggers, build_callbacks(cfg, output_dir, speed), output_dir,
                            cuda_device_args(resources) if speed.cuda else {})
    check_model_fits(cfg, speed, meta_net, trainer, datamodule)  # before the model takes any memory
    module = build_module(cfg, speed, datamodule)
    n_params = sum(p.numel() for p in module.parameters())
    if not secondary_rank():  # each DDP process runs this; the ranks are not set up yet
        logs = ", ".join(f"{type(logger).__name__} {getattr(logger, 'log_dir', None) or logger.save_dir or ''}"
                         for logger in loggers) or "none"
        print(f"[pixelcnn] run dir: {output_dir.resolve()}\n[pixelcnn] {cfg.model.arch}: {n_params:,} parameters"
              f"{f', {cfg.model.num_classes} classes' if cfg.model.num_classes else ''}; "
              f"{speed}; loggers: {logs}", flush=True)

    threading.excepthook = quiet_write_errors
    started, checkpoint = time.perf_counter(), trainer.checkpoint_callback
    try:
        # weights_only: no file, ours or not, is unpickled with code (read_checkpoint has checked it already).
        # ckpt_path: the checkpoint file the train command resolved and checked (`commands.train.RunDirGuard`).
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path or None, weights_only=True)
        fit_seconds = time.perf_counter() - started
        # A path always: given none, Lightning under SLURM would test a requeue's hpc checkpoint. No best (no
        # validation): last.ckpt, the final weights; neither only under fast_dev_run, which saves none.
        test = trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path
                            or checkpoint.last_model_path or None, verbose=False, weights_only=True)
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit with status 0, which a scheduler or a sweep would take for a
        # finished run. StepCheckpoint has said where it saved; outside the training epochs (sanity check, final
        # test) a SIGTERM saves nothing.
        if trainer.is_global_zero and not any(isinstance(c, StepCheckpoint) and c.stopped for c in trainer.callbacks):
            print(f"[pixelcnn] stopped by SIGTERM outside training (nothing new saved); resume with: python train.py "
                  f"ckpt_path={output_dir}", flush=True)
        raise SystemExit(STOPPED_EXIT_CODE) from None
    except Exception:
        # A failed run (e.g. a non-finite loss) still shows in every logger (TensorBoard's HPARAMS tab), marked
        # failed, unless its disk is full; the writers are closed (their threads done) before the run dir may be removed.
        with suppress(OSError):
            log_results(trainer.loggers, cfg, {"hparams/failed": 1.0}, trainer.global_step)
        for logger in trainer.loggers:
            with suppress(OSError):
                logger.finalize("failed")
        raise
    metrics = {
        "val_bpd": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan"),
        "test_bpd": float(test[0]["test/bpd"]),
        "epochs": trainer.current_epoch,
        "parameters": n_params,
        "fit_seconds": round(fit_seconds, 1),
        "best_checkpoint": checkpoint.best_model_path,
        "splits": datamodule.fingerprints,  # what it trained, validated and tested on
    }
    if not trainer.is_global_zero:  # the other DDP ranks: rank 0 scores samples and writes the results
        return metrics
    if cfg.quality_n and (skipped := unscorable(datamodule)):
        print(f"[pixelcnn] {skipped}", flush=True)
    elif cfg.quality_n:  # of the best checkpoint, which `trainer.test` has just loaded
        module = module.to("cuda" if speed.cuda else "cpu")  # Lightning leaves it on the CPU after test
        quality = quality_metrics(module, datamodule, n=cfg.quality_n, temperature=cfg.sample.temperature,
                                  seed=cfg.sample.seed)
        print("[pixelcnn] sample quality: " + ", ".join(f"{k} {v:.4g}" for k, v in quality.items()), flush=True)
        metrics.update(quality)
        for logger in trainer.loggers:
            logger.log_metrics({f"quality/{k}": v for k, v in metrics.items() if k in QUALITY_KEYS}, trainer.global_step)
    # This run's hyperparameters with its final metrics (finite ones only), e.g. TensorBoard's HPARAMS tab.
    log_results(trainer.loggers, cfg, {f"hparams/{k}": v for k, v in metrics.items()
                                       if k in ("val_bpd", "test_bpd", *QUALITY_KEYS) and math.isfinite(v)},
                trainer.global_step)
    write_run_metrics(output_dir / "metrics.json", metrics)
    if checkpoint.best_model_path:
        outcome = f"best val {metrics['val_bpd']:.4f} bits/dim ({checkpoint.best_model_path}), test"
    else:  # Lightning keeps no score under fast_dev_run, nor without a validation (limit_val_batches=0)
        outcome = "no validation score, so no best checkpoint: the final weights tested"
    if trainer.fast_dev_run:
        outcome = f"fast_dev_run ({int(trainer.fast_dev_run)} batch per loop): {outcome}"
    print(f"[pixelcnn] {outcome} {metrics['test_bpd']:.4f} bits/dim, {trainer.current_epoch} epochs in "
          f"{fit_seconds / 60:.1f} min\n[pixelcnn] samples: python sample.py {as_override('ckpt', output_dir)}; "
          f"more epochs: python train.py {as_override('ckpt_path', output_dir)} trainer.max_epochs=<more>", flush=True)
    return metrics


QUALITY_KEYS = ("frechet_distance", "frechet_distance_floor", "class_accuracy")
