"""`train(cfg)`: build data, model and trainer from a composed config, fit, test, return metrics.

Everything a run produces goes into `cfg.output_dir`: the chosen loggers' files (conf/logger/:
TensorBoard's `tb/` by default, `csv/`, MLflow's `mlflow.db` + `mlartifacts/`), checkpoints
(`checkpoints/best-*.ckpt` by val bits/dim, `last.ckpt`, and `step.ckpt` every
checkpoint_every_n_steps and on SIGTERM, after which the run exits 143), `metrics.json`, and
(written by Hydra) the resolved config in `.hydra/`.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from pixelcnn.data import changed_splits
from pixelcnn.likelihood import ARCHITECTURES
from pixelcnn.ops import (STOPPED_EXIT_CODE, as_override, AtomicCheckpointIO, build_callbacks, build_loggers,
                          check_model_fits, claim_job_resources, cuda_device_args, log_failure, planned_steps,
                          read_checkpoint, read_same_network, report_end, report_start, resolve_speed, run_dir_of,
                          raised_in, say, SpeedChoices, StepCheckpoint, UserError, validate)
from pixelcnn.quality import quality_metrics, unscorable


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    return instantiate(cfg.data)


def resolve_num_classes(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """The one check of the class count against the data. model.num_classes=auto becomes the loaded data's class
    count, so that everything after (the model, its footprint, the logged hparams) sees a number; the saved Hydra
    config keeps `auto`; a count (> 0: conditional) must be the data's. A resume continues on the data it trained
    on: its class count (auto: the network check took the checkpoint's) and each split's fingerprint
    (`data.fingerprint`; none in older checkpoints: not compared) against its checkpoint's."""
    auto, count = cfg.model.num_classes == "auto", datamodule.num_classes
    if auto and not count:
        raise UserError(f"model.num_classes=auto but the data ({datamodule.source}) has no classes: use "
                        "model.num_classes=0 (unconditional), or give the images classes (one sub-folder each, "
                        "docs/data.md)")
    if auto:
        cfg.model.num_classes = count
    if cfg.model.num_classes and cfg.model.num_classes != count:
        found = (f"{count} classes ({', '.join(datamodule.class_names[:4])}{', ...' if count > 4 else ''})"
                 if count else "no classes")
        fix = f"model.num_classes={count} or 0" if count else "model.num_classes=0"
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the data ({datamodule.source}) has {found}: "
                        f"use {fix}")
    if not cfg.get("ckpt_path"):
        return
    saved = read_checkpoint(Path(cfg.ckpt_path), "ckpt_path")["hyper_parameters"]
    if auto and saved.get("num_classes") != datamodule.num_classes:
        raise UserError(f"ckpt_path={cfg.ckpt_path} holds a network for {saved.get('num_classes')} classes, but "
                        f"the data ({datamodule.source}) has {datamodule.num_classes} (model.num_classes=auto): "
                        "resume on the data it was trained on, or train a new network from scratch")
    # read_checkpoint has checked its data settings (`checkpoints.saved_data_error`): a mapping, or none
    if change := changed_splits((saved.get("data") or {}).get("splits"), datamodule.fingerprints):
        run = run_dir_of(cfg.ckpt_path) or cfg.ckpt_path
        raise UserError(f"ckpt_path={cfg.ckpt_path} was trained on other data than the {datamodule.source} data now "
                        f"(changed: {change}): resume on the data it was trained on, or start a new run on this data "
                        f"from its weights with {as_override('init_from', run)}")


def data_hparams(num_classes: int, datamodule: L.LightningDataModule) -> dict:
    """What the model takes from the data (saved with it): the class names and the source (the class count was
    checked against the data in `resolve_num_classes`)."""
    return {"class_names": list(datamodule.class_names) if num_classes else None,
            "data": {**datamodule.source_settings(), "splits": datamodule.fingerprints}}


def build_network(cfg: DictConfig) -> torch.nn.Module:
    """The network of the model group: each `model.<key>` is its constructor's argument (e.g. model.residual_blocks
    -> `PixelCNN(residual_blocks=...)`), except the module's own keys (`MODULE_KEYS`)."""
    options = {key: value for key, value in OmegaConf.to_container(cfg.model, resolve=True).items()
               if key not in MODULE_KEYS}
    return ARCHITECTURES[options.pop("arch")](**options)


# Keys of the model group that are the LightningModule's, not the network's.
MODULE_KEYS = ("_target_", "image_size", "ema_decay")


def build_module(cfg: DictConfig, speed: SpeedChoices, datamodule: L.LightningDataModule) -> L.LightningModule:
    """The configured LightningModule for `datamodule`'s data (`data_hparams`), with the optim group and the
    speed choices; `init_from`'s weights if given."""
    # _convert_: plain lists and dicts in hparams, so checkpoints load with weights_only.
    module = instantiate(cfg.model, _convert_="all", net=build_network(cfg), optim=cfg.optim,
                         **data_hparams(cfg.model.num_classes, datamodule))
    if cfg.init_from:  # fine-tuning: these weights, a fresh optimizer (the run starts at step 0)
        path, checkpoint = read_same_network(cfg.init_from, cfg, "init_from", prefer="best")
        module.load_state_dict(checkpoint["state_dict"])
        say(f"init_from: the weights of {path} (step {checkpoint.get('global_step', '?')}), a fresh optimizer")
    if speed.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if speed.compile:  # the whole loss (input scaling, network, cross-entropy) as one graph; weights stay in .net
        module.loss_fn = torch.compile(module.mean_bits_per_dim, mode=cfg.speed.compile_mode, dynamic=False)
    return module


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
        # Lightning's checks of devices / accelerator / strategy, and of options that do not go together (barebones).
        if isinstance(err.__cause__, (MisconfigurationException, ValueError, TypeError)):
            raise UserError("the trainer settings do not fit this machine or each other: "
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


def prepare_run(cfg: DictConfig) -> tuple[L.LightningDataModule, SpeedChoices]:
    """The start of train.py and bench.py: seeded, the data read and set up (model.num_classes=auto resolved),
    and the speed choices for the whole configured run."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.speed.matmul_precision)
    datamodule = build_datamodule(cfg)
    # Fails here, before any training output, if the data is missing or corrupt or a split does not fit
    # (data.val_size); Lightning's call is then a no-op.
    datamodule.setup()
    resolve_num_classes(cfg, datamodule)  # and a resume's data: the same as its checkpoint's
    return datamodule, resolve_speed(cfg, planned_steps(cfg, len(datamodule.train_set[0])))


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test the configured model; returns {"val_bpd": best, "test_bpd": ..., ...}."""
    validate(cfg, "train")
    # Threads (and GPU) of a job that shares the machine with others: before any torch work.
    resources = claim_job_resources(cfg.trainer.accelerator, cfg.trainer.devices)
    output_dir = Path(cfg.output_dir)
    datamodule, speed = prepare_run(cfg)
    with torch.device("meta"):  # the model's own option checks, before Lightning prints; no memory
        meta_net = build_network(cfg)

    trainer = build_trainer(cfg, speed, build_loggers(cfg), build_callbacks(cfg, output_dir, speed), output_dir,
                            cuda_device_args(resources) if speed.cuda else {})
    check_model_fits(cfg, speed, meta_net, trainer, len(datamodule.train_set[0]))  # before the model takes memory
    module = build_module(cfg, speed, datamodule)
    n_params = sum(p.numel() for p in module.parameters())
    report_start(cfg, output_dir, n_params, speed, trainer)

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
                  f"{as_override('ckpt_path', output_dir)}", flush=True)
        raise SystemExit(STOPPED_EXIT_CODE) from None
    except Exception as err:
        log_failure(trainer, cfg)
        # Lightning's own refusal, as the loops start, of limits or intervals that do not fit this data's batches
        # (raised by its trainer or loops themselves, not by the model)
        if isinstance(err, (MisconfigurationException, ValueError)) and raised_in(err, "lightning/pytorch/"):
            raise UserError("the trainer settings do not fit this data: " + " ".join(str(err).split())) from None
        raise
    metrics = {
        "val_bpd": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan"),
        "test_bpd": float(test[0]["test/bpd"]) if test else float("nan"),  # none: trainer.limit_test_batches=0
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
    report_end(cfg, output_dir, metrics, trainer)  # in every logger, in metrics.json, and on the console
    return metrics
