"""Checks every job of a sweep before the first one trains (`sweep_errors`, run by the train
command's SweepPrecheck callback), each job composed with Hydra's own sweep expansion and config
loader; bad jobs get one `error:` line each. The Optuna sweeper's jobs are not known in advance: its
search space is checked instead (`search_space_checks`)."""

from __future__ import annotations

from types import SimpleNamespace

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from pixelcnn.ops.resources import JOBLIB_LAUNCHER, resolve_speed
from pixelcnn.ops.rules import validate
from pixelcnn.ops.errors import UserError, override_error, user_errors_unwrapped
from pixelcnn.ops.sweep import OPTUNA_SWEEPER

# Launchers that run the jobs on this machine: only then is this machine's device the jobs' device.
LOCAL_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", JOBLIB_LAUNCHER)


def job_error(master: DictConfig, overrides: list[str]) -> str | None:
    """The one-line error the job with these overrides would fail with as it starts, or None, found without
    loading data: the value checks, the accelerator (if the job runs on this machine), the model's own checks
    (built on the meta device, so no memory is used), and a conditional model on data without classes (by file
    names: `has_classes`). Another data-dependent error (e.g. data.val_size) shows when the job runs."""
    import torch
    from hydra.utils import instantiate

    from pixelcnn.ops.sources import has_classes
    from pixelcnn.training import resolve_num_classes

    try:  # with the config loader the sweep composes its jobs with
        cfg = GlobalHydra.instance().hydra.config_loader.load_sweep_config(master, overrides)
        validate(cfg, "train")
        if cfg.get("ckpt_path"):  # a resume brings back its run's config and continues in its dir: one run
            raise UserError("ckpt_path continues one run, in its own dir: resume it without -m, or start a new run "
                            "from its weights in each job with init_from=<run>")
        with user_errors_unwrapped():
            if OmegaConf.select(master, "hydra.launcher._target_") in LOCAL_LAUNCHERS:
                resolve_speed(cfg)  # the accelerator: trainer.accelerator=gpu without CUDA here
            with torch.device("meta"):  # the class count (auto: the data's, unknown here) is not in the model's checks
                instantiate(cfg.model, _convert_="all", num_classes=0)
        if cfg.model.num_classes and not has_classes(cfg.data.source, cfg.data.path):  # the job's own error, by names
            resolve_num_classes(cfg, SimpleNamespace(num_classes=0, source=cfg.data.source))  # auto or a count
    except ConfigCompositionException as err:  # e.g. a key the job's model does not have
        return override_error(err, overrides, master.hydra.job.config_name)
    except UserError as err:
        return str(err)
    return None


def search_space_checks(arguments: list[str]) -> list[tuple[str, list[str]]]:
    """(label, overrides) for each value of the Optuna search space worth checking: every choice, or both
    ends of a range or interval, as the sweeper reads them (its own parser: a range's end is suggested too)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override as distribution

    parsed = OverridesParser.create().parse_overrides(arguments)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    space = {o.get_key_element(): (o, distribution(o)) for o in parsed if o.is_sweep_override()}
    # One parameter at a time, the others at their config values: a bad end is named by its own key.
    return [(f"search space {override.input_line.split('=', 1)[1]} of {key}, at {key}={value}",
             fixed + [f"{key}={value}"]) for key, (override, values) in space.items()
            for value in getattr(values, "choices", None) or dict.fromkeys([values.low, values.high])]


def sweep_errors(config: DictConfig) -> list[str]:
    """One `error: <job>: <why>` line for each job (Optuna: each search-space value) of the sweep
    `config` describes that would fail as it starts; empty if all pass or the sweeper is another."""
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_")
    # The sweeper's own params (e.g. hparams_search's), then the command line's overrides.
    arguments = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    arguments += [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task)]
    checks = []  # another sweeper: its jobs are checked as they start
    if sweeper == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper":
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        # The jobs' overrides, as Hydra's BasicSweeper expands them (its own code).
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
        [jobs] = BasicSweeper.split_arguments(parser.parse_overrides(arguments), max_batch_size=None)
        common = set.intersection(*map(set, jobs))  # in every job: a job is named by the others (never no job)
        checks = [(f"job {n} ({' '.join(o for o in job if o not in common) or ' '.join(job)})", job)
                  for n, job in enumerate(jobs)]
    elif sweeper == OPTUNA_SWEEPER:
        checks = search_space_checks(arguments)
    errors = {}  # one line per job; Optuna: per error, as a bad fixed override shows in every check of the space
    for label, overrides in checks:
        if (error := job_error(config, overrides)) is not None:
            errors.setdefault(error if sweeper == OPTUNA_SWEEPER else label, f"error: {label}: {error}")
    return list(errors.values())
