"""What a training run reports: its loggers (the `logger` group), the hyperparameters and final metrics
it logs in each (also when it fails), and its lines on the console at the start and the end."""

from __future__ import annotations

import math
import threading
from contextlib import suppress
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.logger import _flatten_dict, _sanitize_params
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from pixelcnn.ops.errors import WRITE_ERRNOS, UserError, failure_reason
from pixelcnn.ops.files import write_json
from pixelcnn.ops.rules import as_override, check_sqlite

QUALITY_KEYS = ("frechet_distance", "frechet_distance_floor", "class_accuracy")


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers the `logger` group chose (each option of conf/logger/ holds named loggers, so
    logger=[tensorboard,mlflow] gives both; ~logger none); a missing package is one error line."""
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if (uri := str(logger_cfg.get("tracking_uri"))).startswith("sqlite:///"):  # before MLflow opens it
            check_sqlite(uri.removeprefix("sqlite:///"), f"logger.{name}.tracking_uri", "experiments")
        try:
            loggers.append(instantiate(logger_cfg))
        except InstantiationException as err:
            if isinstance(err.__cause__, ModuleNotFoundError):  # Lightning's check of an optional package
                # Only mlflow is optional among conf/logger/'s loggers; its extra has the logger's name.
                raise UserError(f"logger={name} needs the {name} package, which is not installed: "
                                f"pip install -e '.[{name}]' (or pip install {name})") from None
            # The logger's settings or its store (e.g. an MLflow database of an older schema: MLflow's own advice)
            raise UserError(f"logger.{name} cannot start: {failure_reason(err.__cause__ or err)}") from None
    # TensorBoard's writer thread raises a failed write (e.g. a full disk) again in the main thread, which
    # reports it in one line (`errors.user_errors_unwrapped`): the thread's own traceback is left out.
    threading.excepthook = quiet_write_errors
    return loggers


def quiet_write_errors(args: threading.ExceptHookArgs) -> None:
    """`threading.excepthook`: a thread's failed write is left unprinted; any other error is printed as usual."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRNOS):
        threading.__excepthook__(args)


def log_results(trainer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """This run's hyperparameters worth comparing (flattened to scalars as Lightning's loggers do, "." between
    levels, no Hydra `_key_`) with its final `metrics` (hparams/*, at the trainer's step), in every logger of
    `trainer`: TensorBoard takes them together (its HPARAMS tab), the others (CSV, MLflow) the hyperparameters
    as such and the metrics as metrics."""
    keep = {**{group: OmegaConf.to_container(cfg[group], resolve=True) for group in ("model", "optim", "data")},
            "seed": cfg.seed, "max_epochs": cfg.trainer.max_epochs,
            "trainer": {key: cfg.trainer[key] for key in ("gradient_clip_val", "gradient_clip_algorithm",
                                                          "accumulate_grad_batches")}}
    flat = _sanitize_params(_flatten_dict(keep, delimiter="."))
    params = {key: value for key, value in flat.items() if not any(part.startswith("_") for part in key.split("."))}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics)
        else:
            logger.log_hyperparams(params)
            if metrics:
                logger.log_metrics(metrics, trainer.global_step)
        logger.save()


def log_failure(trainer, cfg: DictConfig) -> None:
    """A failed run (e.g. a non-finite loss) still shows in every logger (TensorBoard's HPARAMS tab), marked
    failed, unless its disk is full; the writers are closed (their threads done) before the run dir may be removed."""
    with suppress(OSError):
        log_results(trainer, cfg, {"hparams/failed": 1.0})
    for logger in trainer.loggers:
        with suppress(OSError):
            logger.finalize("failed")


def report_start(cfg: DictConfig, output_dir: Path, parameters: int, speed, trainer) -> None:
    if not trainer.is_global_zero:  # each DDP process runs this (the trainer knows its rank from its start)
        return
    logs = ", ".join(f"{type(logger).__name__} {getattr(logger, 'log_dir', None) or logger.save_dir or ''}"
                     for logger in trainer.loggers) or "none"
    print(f"[pixelcnn] run dir: {output_dir.resolve()}\n[pixelcnn] {cfg.model.arch}: {parameters:,} parameters"
          f"{f', {cfg.model.num_classes} classes' if cfg.model.num_classes else ''}; "
          f"{speed}; loggers: {logs}", flush=True)


def report_end(cfg: DictConfig, output_dir: Path, metrics: dict, trainer) -> None:
    """This run's hyperparameters with its final metrics (finite ones only) in every logger, e.g. TensorBoard's
    HPARAMS tab, the metrics in metrics.json, and the outcome with the commands that go on from it."""
    log_results(trainer, cfg, {f"hparams/{k}": v for k, v in metrics.items()
                               if k in ("val_bpd", "test_bpd", *QUALITY_KEYS) and math.isfinite(v)})
    write_json(output_dir / "metrics.json", metrics)
    # No best checkpoint: Lightning keeps no score under fast_dev_run, nor without a validation (limit_val_batches=0).
    best = metrics["best_checkpoint"]
    outcome = (f"best val {metrics['val_bpd']:.4f} bits/dim ({best}), test" if best
               else "no validation score, so no best checkpoint: the final weights tested")
    if trainer.fast_dev_run:
        outcome = f"fast_dev_run ({int(trainer.fast_dev_run)} batch per loop): {outcome}"
    print(f"[pixelcnn] {outcome} {metrics['test_bpd']:.4f} bits/dim, {trainer.current_epoch} epochs in "
          f"{metrics['fit_seconds'] / 60:.1f} min\n"
          f"[pixelcnn] samples: python sample.py {as_override('ckpt', output_dir)}; "
          f"more epochs: python train.py {as_override('ckpt_path', output_dir)} trainer.max_epochs=<more>", flush=True)
