"""Where train.py's config becomes final (`complete`), once, before anything uses it: a resume's saved
values and checkpoint, a requeued SLURM job's, absolute paths, the sweep's job dir names. Two kinds of
value wait for `training.train`: model.num_classes=auto (`resolve_num_classes`) needs the data, and the
speed group's and trainer.precision's auto (`resolve_speed`) the device; neither is known before."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pixelcnn.ops.checkpoints import read_same_network
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.resources import say, secondary_rank
from pixelcnn.ops.rules import PATH_KEYS, as_override, validate
from pixelcnn.ops.run_dirs import fresh_dir, requeued_job, run_dir_of

# Never taken back from a saved config: where this run writes and what it continues or starts from.
NOT_RESTORED = ("hydra", "output_dir", "ckpt_path", "init_from")


def complete(config: DictConfig) -> tuple[Path, bool]:
    """Complete train.py's config in place; returns the run dir and whether the run resumes in it.
    Called with the composed config in `RunDirGuard` (Hydra saves it as the run's record after), with
    the sweep's (its overrides, from which Hydra composes every job) and with each sweep job's config in
    the task (Hydra saves a job's record before any callback could change it). A job that SLURM requeued
    (preempted, or past its time limit) continues its run or job dir from its latest checkpoint, as
    `ckpt_path=<that dir>` would; its init_from (the first start's weights) is in that checkpoint."""
    if "hydra" in config and config.hydra.mode == RunMode.MULTIRUN:
        # Each job is composed from the sweep's overrides: the paths it does not sweep go in absolute, and the
        # job dirs are named after what the sweep varies (`3_optim.lr=0.0005`, `run_dirs.sweep_subdir`): the
        # other keys join Hydra's override_dirname.exclude_keys (a job's config no longer tells which were swept).
        task = [str(o) for o in config.hydra.overrides.task]
        overrides = OverridesParser.create().parse_overrides(task)
        swept = {o.key_or_group for o in overrides if o.is_sweep_override()}
        swept |= set(OmegaConf.select(config, "hydra.sweeper.params") or {})  # e.g. the Optuna search space
        paths = {k: p for k, p in absolute_paths(config).items() if k not in swept and p != OmegaConf.select(config, k)}
        kept = list(config.hydra.job.config.override_dirname.exclude_keys)
        excluded = ",".join(kept + [o.key_or_group for o in overrides if o.key_or_group not in swept | set(kept)])
        with read_write(config.hydra.overrides):  # as_override without the shell's quotes: Hydra's
            config.hydra.overrides.task = ([o for o in task if o.lstrip("+~").partition("=")[0] not in paths]
                                           + [shlex.split(as_override(key, path))[0] for key, path in paths.items()])
            config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{excluded}]")
        return Path(str(config.hydra.sweep.dir)), False
    job = "hydra" not in config  # a sweep job's own config (Hydra composed it with the sweep's completed overrides)
    run_dir = Path(str(config.output_dir if job else config.hydra.run.dir))
    # str: ckpt_path=3 is a path. The default run name is reserved last, once nothing can fail (`fresh_dir`).
    ckpt_path = str(config.ckpt_path) if config.get("ckpt_path") else None
    default_name = not job and str(OmegaConf.to_container(config.hydra.run)["dir"]).startswith("${resume_run_dir:")
    if requeued := not ckpt_path and requeued_job() and (run_dir / ".hydra").is_dir():
        ckpt_path = str(run_dir)  # SLURM ran its command line again, in the dir it started (a fixed name)
    resume_dir = Path(run_dir_of(ckpt_path)) if ckpt_path and run_dir_of(ckpt_path) else None
    resuming = resume_dir is not None and run_dir.resolve() == resume_dir.resolve()
    with read_write(config):
        config.ckpt_path = ckpt_path
        if not job:  # fixed now: they follow ckpt_path, which becomes the checkpoint file
            config.hydra.run.dir, config.hydra.output_subdir = str(run_dir), config.hydra.output_subdir
        if ckpt_path:
            config.ckpt_path = resume(config, ckpt_path, resume_dir, resuming, job)
        if requeued:
            config.init_from = None
            say(f"SLURM requeued this job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): "
                + (f"continuing it from {config.ckpt_path}" if job else f"continuing its run in {run_dir}"))
        for key, path in absolute_paths(config).items():
            OmegaConf.update(config, key, path)
        if default_name and not resuming and not secondary_rank():  # outputs/<date>/<time>, or with a suffix
            config.hydra.run.dir = str(run_dir := Path(fresh_dir(str(run_dir))))
    return run_dir, resuming


def resume(config: DictConfig, ckpt_path: str, resume_dir: Path | None, in_place: bool, job: bool) -> str | None:
    """The checkpoint file a resume continues from (None: a run killed before its first one starts again in its
    dir), after `restore_saved_config`; exits 0 if the run in place has finished. DDP ranks > 0 (Lightning re-runs
    the command with hydra.output_subdir=null) get the same config and checkpoint."""
    if not job and resume_dir is not None and (resume_dir / ".hydra" / "config.yaml").is_file():
        restore_saved_config(config, resume_dir)
    try:
        path, checkpoint = read_same_network(ckpt_path, config, "ckpt_path", prefer="last")
    except UserError:
        if not (in_place and Path(ckpt_path).is_dir() and (resume_dir / ".hydra").is_dir()
                and not (resume_dir / "metrics.json").exists() and not any(resume_dir.rglob("*.ckpt"))):
            raise
        say(f"{resume_dir} has no checkpoint (it stopped before its first one): training it from the start, "
            "with its saved config")
        return None
    # Every process of an srun job reads the same files: all exit (a sweep job is never finished: SLURM requeued it).
    if in_place and not job:
        validate(config, "train")  # first: finished_run compares the checkpoint with trainer.max_* as given
        if reason := finished_run(resume_dir, checkpoint, config.trainer):
            say(f"{resume_dir} has already finished ({reason}); nothing was changed")
            sys.exit(0)
    return str(path)


def finished_run(run_dir: Path, checkpoint: dict, trainer: DictConfig) -> str | None:
    """Why the run in `run_dir` is over, or None if resuming it from `checkpoint` would train more:
    it wrote its metrics.json (it ended) and reached trainer.max_epochs, max_steps or max_time, or
    was stopped early (a resume restores the stopping state and the time spent, so it would stop at once)."""
    try:
        epochs = json.loads((run_dir / "metrics.json").read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):  # no metrics.json (the run did not end), or not ours
        return None
    max_epochs, max_steps = trainer.get("max_epochs", -1), trainer.get("max_steps", -1)
    if isinstance(epochs, int) and max_epochs != -1 and epochs >= max_epochs:
        return (f"it trained {epochs} epochs, trainer.max_epochs={max_epochs}: pass trainer.max_epochs=<more> to "
                "extend it")
    if max_steps != -1 and checkpoint.get("global_step", 0) >= max_steps:
        return f"it took trainer.max_steps={max_steps} optimizer steps: pass trainer.max_steps=<more> to extend it"
    callbacks = checkpoint.get("callbacks", {})
    if any(key.startswith("EarlyStopping") and state.get("stopped_epoch", 0) > 0 for key, state in callbacks.items()):
        return f"early stopping ended it after {epochs} epochs"
    if max_time := trainer.get("max_time"):
        limit = sum(int(part) * unit for part, unit in zip(max_time.split(":"), (86400, 3600, 60, 1)))  # DD:HH:MM:SS
        if callbacks.get("Timer", {}).get("time_elapsed", {}).get("train", 0) >= limit:
            return f"it trained for trainer.max_time={max_time}: pass a larger trainer.max_time to extend it"
    return None


def restore_saved_config(config: DictConfig, run_dir: Path) -> None:
    """`train.py ckpt_path=<run> [overrides]`: `config` becomes the run's own, this command line's
    overrides on top. A run dir is data from anywhere: its files are read as plain YAML; a group
    choice (model=gated) is taken only if it names an option in conf/<group>/; the config is
    composed again with those choices; saved values are copied onto keys it has that were not
    overridden now: plain values only, no `_key_` (`_target_`), no interpolation (resolvers create
    folders, read the environment). `validate` then checks every value, as for any run."""
    # The run's newest config record: that of its last resume (.hydra/resume-<time>/, so a changed optim.lr
    # or max_epochs carries on), else the one it started with (.hydra/).
    record = max((p.parent for p in (run_dir / ".hydra").glob("resume-*/config.yaml")), default=run_dir / ".hydra")
    saved, choices = read_saved_yaml(record / "config.yaml"), read_saved_yaml(record / "hydra.yaml")
    for key in ("hydra", "runtime", "choices"):  # hydra.runtime.choices, where each level is a dict
        choices = choices.get(key) if isinstance(choices.get(key), dict) else {}
    task = [str(o) for o in config.hydra.overrides.task]
    # Kept as they are now, with the keys under them: this command line's overrides, and NOT_RESTORED.
    kept = {o.key_or_group.replace("/", ".") for o in OverridesParser.create().parse_overrides(task)} | {*NOT_RESTORED}
    loader, now = GlobalHydra.instance().hydra.config_loader, config.hydra.runtime.choices
    groups = [f"{group}={option}" for group, option in choices.items()
              if group in now and not group.startswith("hydra/") and group != "hparams_search"  # -m presets
              and group.replace("/", ".") not in kept and option != now[group] and isinstance(option, str)
              and option in loader.get_group_options(group)]
    try:
        composed = loader.load_sweep_config(config, groups + task)
    except ConfigCompositionException as err:  # an override of this command line that the run's config lacks
        cause = " ".join(str(err.__cause__ or "").split()[:12])
        raise UserError(f"{str(err).splitlines()[0]} ({cause}): not a key of the config of {run_dir} "
                        f"({' '.join(groups) or 'the defaults'}); drop that override") from None
    restored, ignored = [], []

    def copy(values: dict, own: dict, prefix: str) -> None:
        for key, value in values.items():
            name = f"{prefix}{key}"
            if value == own.get(key, ...) or any(f"{name}.".startswith(f"{k}.") for k in kept):  # ...: not a key of own
                continue
            if isinstance(value, dict) and isinstance(own.get(key), dict):  # `own` is a dict: recurse into dicts only
                copy(value, own[key], f"{name}.")
            elif key not in own or str(key).startswith("_") or isinstance(own[key], dict) or not plain_value(value):
                ignored.append(name)
            else:
                OmegaConf.update(composed, name, value, merge=False)
                restored.append(f"{name}={value}")

    copy(saved, OmegaConf.to_container(composed, resolve=False), "")
    with read_write(config), open_dict(config):
        for key in [key for key in config if key != "hydra"]:
            del config[key]
        for key, value in composed.items_ex(resolve=False):
            if key != "hydra":
                config[key] = value
        config.hydra.runtime.choices = composed.hydra.runtime.choices
    say(f"resuming {run_dir}: re-applying the run's overrides, read from {record} as data: "
        f"{' '.join(groups + restored) or '(none)'}")
    if ignored:
        say(f"ignored in {record}: {', '.join(ignored)} (not plain values of this project's config keys)")


def read_saved_yaml(path: Path) -> dict:
    """A YAML file of a run dir as plain data (`yaml.safe_load`: no tag can build an object); {} if absent."""
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path} cannot be read as a saved config ({type(err).__name__}): it is damaged or not a "
                        "run's record; restore it from a copy of the run (a resume's record, .hydra/resume-<time>/, "
                        "may be removed: the run's earlier one is read then)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a saved config (not a mapping of keys to values)")
    return data


def plain_value(value: Any) -> bool:
    """A scalar or a list of scalars, without an interpolation (which a resolver would run)."""
    items = value if isinstance(value, list) else [value]
    return all(v is None or isinstance(v, (int, float, bool)) or (isinstance(v, str) and "${" not in v) for v in items)


def absolute_paths(config: DictConfig) -> dict[str, str]:
    """The path keys of `config` as absolute paths. Every path a run records (its .hydra record, checkpoints,
    metrics.json) is absolute, so that a resume reads the same files from any working directory; a relative
    one in an older run's record is still taken from the working directory, as it was."""
    values = {key: OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False) for key in PATH_KEYS}
    return {key: os.path.abspath(os.path.expanduser(str(value))) for key, value in values.items()
            if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip()}
