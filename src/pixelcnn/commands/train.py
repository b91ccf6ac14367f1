"""What `train.py` does around `training.train(cfg)`: the run dir checks and a resumed run's
config and checkpoint, before Hydra writes, and a sweep that survives its failing jobs: each job's
config is checked before any trains, a failing job is recorded and the others go on, and a
summary is written at the end. The three Hydra callbacks are named in conf/train.yaml."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import sys
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pixelcnn.ops.checkpoints import read_same_network
from pixelcnn.commands.cli import exit_on_user_error
from pixelcnn.ops.errors import error_line
from pixelcnn.ops.rules import PATH_KEYS, as_override
from pixelcnn.ops.errors import UserError, user_errors_unwrapped
from pixelcnn.ops.resources import secondary_rank
from pixelcnn.ops.run_dirs import (RunDirInUse, check_run_dir, claim_if_new, fresh_dir, hold_run_dir, holds_checkpoints,
                                register_resolvers, requeued_job, run_dir_of)
from pixelcnn.ops.sweep import start_study_sweep, write_run_metrics, write_summary
from pixelcnn.ops.sweep_check import sweep_errors

register_resolvers()  # conf/train.yaml's run dir names; here, so that every process running a job has them


def main(cfg: DictConfig) -> float | None:
    """Train and test; returns the run's best val bits/dim, the value a sweeper (hparams_search=optuna)
    minimizes, or None for a sweep job that failed."""
    from pixelcnn.training import train  # imported late so that `--help` and config errors are fast
    # That import runs lightning/__init__, which gives the `lightning` logger a terminal handler of its own;
    # Hydra's job logging (conf/train.yaml) ran before it, so each Lightning line would print twice.
    logging.getLogger("lightning").handlers.clear()

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a failing job is recorded; the other jobs still run
        with record_job_failure(cfg.output_dir, HydraConfig.get().job.num), sweep_job_dir(cfg):
            return train(cfg)["val_bpd"]
        # Not NaN: with optuna 2.10 the Optuna sweeper crashes on a NaN value; a non-float marks the trial failed.
        return None
    # Removed after an input error only if this run created it; of a resumed run, only its record
    # .hydra/resume-<time>/ (a refused resume leaves none, so the next one reads the run's last good one).
    record = str(HydraConfig.get().output_subdir)
    with exit_on_user_error(cleanup_dir=Path(cfg.output_dir) / record if "/resume-" in record else cfg.output_dir):
        return train(cfg)["val_bpd"]


@contextmanager
def sweep_job_dir(cfg: DictConfig):
    """A sweep job holds its dir's lock while it runs (`run_dirs.hold_run_dir`: a resume of that dir is
    refused meanwhile, and a second process on the same job dir too), whatever the launcher; Hydra's
    on_job_start cannot refuse a job (it turns a callback's exception into a warning). A job that SLURM
    requeued (preempted, or past its time limit with hydra.launcher.max_num_timeout > 0) runs again in
    the same job dir: it continues from that dir's latest checkpoint, as `ckpt_path=<job dir>` would."""
    job_dir = Path(cfg.output_dir)
    lock = None if secondary_rank() else hold_run_dir(job_dir, f"the job dir {job_dir}")
    try:
        if requeued_job() and holds_checkpoints(job_dir):
            path, _ = read_same_network(job_dir, cfg, "ckpt_path", prefer="last")
            if not secondary_rank():
                print(f"[pixelcnn] SLURM requeued this job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): "
                      f"continuing it from {path}", flush=True)
            with read_write(cfg):  # a resume, not a fine-tuning any more: the weights come from the checkpoint
                cfg.ckpt_path, cfg.init_from = str(path), None
        yield
    finally:
        if lock is not None:  # the process (a serial sweep's, a joblib worker) goes on to other jobs
            os.close(lock)  # releases the flock


@contextmanager
def record_job_failure(job_dir: str | Path, job: int | str):
    """In a sweep, a job that fails must not end the sweep (Hydra's BasicSweeper re-raises a job's
    exception, and `sys.exit` would end the process): the failure is written to the job's
    metrics.json as {"status": "failed", "error": <one line>} and one `error:` line is printed.
    SweepSummary lists it and makes the sweep exit non-zero at the end. Anything but a user
    error or running out of memory names the file that holds its traceback (`cli.error_line`)."""
    try:
        with user_errors_unwrapped():
            yield
    except Exception as err:  # noqa: BLE001 - every failure of one job is recorded, the sweep goes on
        if secondary_rank():  # a DDP job's other processes: rank 0 records the failure
            return
        reason = error_line(err)
        # Not in a dir another process holds (it is that run's); the summary lists a job without one as failed.
        with suppress(OSError):  # e.g. the disk that failed the job is full: the error line still tells
            if not isinstance(err, RunDirInUse):
                write_run_metrics(Path(job_dir) / "metrics.json", {"status": "failed", "error": reason})
        print(f"error: job {job} failed: {reason}", file=sys.stderr, flush=True)


def finished_run(run_dir: Path, checkpoint: dict, trainer: DictConfig) -> str | None:
    """Why the run in `run_dir` is over, or None if resuming it from `checkpoint` would train more:
    it wrote its metrics.json (it ended) and reached trainer.max_epochs, max_steps or max_time, or
    was stopped early (a resume restores the stopping state and the time spent, so it would stop at once)."""
    try:
        epochs = json.loads((run_dir / "metrics.json").read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):  # no metrics.json (the run did not end), or not ours
        return None
    max_epochs, max_steps, max_time = trainer.get("max_epochs", -1), trainer.get("max_steps", -1), trainer.get("max_time")
    if isinstance(epochs, int) and max_epochs != -1 and epochs >= max_epochs:
        return f"it trained {epochs} epochs, trainer.max_epochs={max_epochs}: pass trainer.max_epochs=<more> to extend it"
    if max_steps != -1 and checkpoint.get("global_step", 0) >= max_steps:
        return f"it took trainer.max_steps={max_steps} optimizer steps: pass trainer.max_steps=<more> to extend it"
    callbacks = checkpoint.get("callbacks", {})
    if any(key.startswith("EarlyStopping") and state.get("stopped_epoch", 0) > 0 for key, state in callbacks.items()):
        return f"early stopping ended it after {epochs} epochs"
    if max_time:
        limit = sum(int(part) * unit for part, unit in zip(max_time.split(":"), (86400, 3600, 60, 1)))  # DD:HH:MM:SS
        if callbacks.get("Timer", {}).get("time_elapsed", {}).get("train", 0) >= limit:
            return f"it trained for trainer.max_time={max_time}: pass a larger trainer.max_time to extend it"
    return None


# Never taken back from a saved config: where this run writes and what it continues or starts from.
NOT_RESTORED = ("hydra", "output_dir", "ckpt_path", "init_from")


def restore_saved_config(config: DictConfig, run_dir: Path, announce: bool) -> None:
    """`train.py ckpt_path=<run> [overrides]`: `config` becomes the run's own, this command line's
    overrides on top. A run dir is data from anywhere: its files are read as plain YAML; a group
    choice (model=gated) is taken only if it names an option in conf/<group>/; the config is
    composed again with those choices; saved values are copied onto keys it has that were not
    overridden now: plain values only, no `_key_` (`_target_`), no interpolation (resolvers create
    folders, read the environment). `validate` then checks every value, as for any run."""
    # The run's newest config record: that of its last resume (.hydra/resume-<time>/, so a changed optim.lr
    # or max_epochs carries on), else the one it started with (.hydra/).
    records = sorted((run_dir / ".hydra").glob("resume-*/config.yaml"))
    record = records[-1].parent if records else run_dir / ".hydra"
    saved = read_saved_yaml(record / "config.yaml")
    choices = read_saved_yaml(record / "hydra.yaml")
    for key in ("hydra", "runtime", "choices"):  # hydra.runtime.choices, where each level is a dict
        choices = choices.get(key) if isinstance(choices, dict) else {}
    choices = choices if isinstance(choices, dict) else {}
    if isinstance(saved.get("scheduler"), dict) and isinstance(saved.get("model"), dict) and "optim" not in saved:
        # Saved before the optim group: the optimizer's values were the model's, the schedule a group of its own.
        saved["optim"] = {**{k: saved["model"].pop(k) for k in ("lr", "weight_decay") if k in saved["model"]},
                          "scheduler": saved.pop("scheduler")}
        choices = {("optim/scheduler" if group == "scheduler" else group): option for group, option in choices.items()}
    task = [str(o) for o in config.hydra.overrides.task]
    given = {o.key_or_group.replace("/", ".") for o in OverridesParser.create().parse_overrides(task)}
    loader, now = GlobalHydra.instance().hydra.config_loader, config.hydra.runtime.choices
    groups = [f"{group}={option}" for group, option in choices.items()
              if group in now and not group.startswith("hydra/") and group != "hparams_search"  # -m presets
              and group.replace("/", ".") not in given and option != now[group] and isinstance(option, str)
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
            if (not prefix and key in NOT_RESTORED) or name in given or any(name.startswith(g + ".") for g in given):
                continue
            if not isinstance(own, dict) or key not in own:
                ignored.append(name)
            elif isinstance(value, dict) and isinstance(own[key], dict):
                copy(value, own[key], f"{name}.")
            elif value != own[key]:
                if str(key).startswith("_") or isinstance(own[key], dict) or not plain_value(value):
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
    if announce:
        print(f"[pixelcnn] resuming {run_dir}: re-applying the run's overrides, read from {record} as data: "
              f"{' '.join(groups + restored) or '(none)'}", flush=True)
        if ignored:
            print(f"[pixelcnn] ignored in {record}: {', '.join(ignored)} (not plain values of this "
                  "project's config keys)", flush=True)


def read_saved_yaml(path: Path) -> dict:
    """A YAML file of a run dir as plain data (`yaml.safe_load`: no tag can build an object); {} if absent."""
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path} cannot be read as a saved config ({type(err).__name__}): it is damaged or not a "
                        "run's record; restore it from a copy of the run") from None
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
    paths = {}
    for key in PATH_KEYS:
        value = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
            paths[key] = os.path.abspath(os.path.expanduser(str(value)))
    return paths


class RunDirGuard(Callback):
    """Before Hydra writes into the run dir: checks it (`run_dirs.check_run_dir`); for a resume,
    the run's config (`restore_saved_config`), its latest checkpoint (which must hold this config's
    network), or exit 0 if the run has finished; then locks the run dir (`run_dirs.hold_run_dir`: a second run
    in it is refused). A job that SLURM requeued resumes its run dir (`run_dirs.requeued_job`). Hydra
    turns a callback's exception into a warning, so a refusal exits here. DDP ranks > 0 (Lightning re-runs
    the command with hydra.output_subdir=null) get the same config and checkpoint, unchecked; bench.py
    (no record) is not checked."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        rank_zero = config.hydra.output_subdir is not None
        ckpt_path = str(config.ckpt_path) if config.get("ckpt_path") else None  # str: ckpt_path=3 is a path
        run_dir = Path(str(config.hydra.run.dir))
        requeued = not ckpt_path and requeued_job() and (run_dir / ".hydra").is_dir()
        if requeued:
            # SLURM started this job again with its command line (hydra.run.dir=<a name that does not change,
            # e.g. ${oc.env:SLURM_JOB_ID}>): it continues its run, as ckpt_path=<that dir> would.
            ckpt_path = str(run_dir)
            with read_write(config):
                config.ckpt_path = ckpt_path
            if rank_zero and not secondary_rank():
                print(f"[pixelcnn] SLURM requeued this job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): "
                      f"continuing its run in {run_dir}", flush=True)
        if not rank_zero and not ckpt_path:
            return
        resume_dir = run_dir_of(ckpt_path) if ckpt_path else None
        resuming = resume_dir is not None and run_dir.resolve() == Path(resume_dir).resolve()
        if rank_zero and not resuming and str(OmegaConf.to_container(config.hydra.run)["dir"]).startswith("${resume_run_dir:"):
            # The default name (outputs/<date>/<time>): reserve it, or a suffixed one if another run has it.
            run_dir = Path(fresh_dir(str(run_dir)))
        with exit_on_user_error(cleanup_dir=run_dir if rank_zero else None):
            if rank_zero:
                check_run_dir(run_dir, "hydra.run.dir", resuming)
            with read_write(config.hydra):  # fixed now: they follow ckpt_path, which becomes the checkpoint file
                config.hydra.run.dir = str(run_dir)
                config.hydra.output_subdir = config.hydra.output_subdir
            if rank_zero and resuming:  # .hydra/resume-<time>/: this run's own record
                claim_if_new(run_dir / config.hydra.output_subdir)
            if ckpt_path:
                self.resume(config, ckpt_path, Path(resume_dir) if resume_dir else None, resuming)
            if requeued:
                with read_write(config):  # its init_from= (the first start's weights) is in the checkpoint now
                    config.init_from = None
            with read_write(config):
                for key, path in absolute_paths(config).items():
                    OmegaConf.update(config, key, path)
        if rank_zero and not secondary_rank():  # DDP ranks started by srun / torchrun run this too: rank 0 holds the dir
            with exit_on_user_error():  # no cleanup: the dir is the other run's
                hold_run_dir(run_dir, f"{'ckpt_path' if resuming else 'hydra.run.dir'}={run_dir}")

    @staticmethod
    def resume(config: DictConfig, ckpt_path: str, resume_dir: Path | None, in_place: bool) -> None:
        """Set the run's config and its checkpoint file (config.ckpt_path), or exit if it has finished."""
        rank_zero = config.hydra.output_subdir is not None
        if resume_dir is not None and (resume_dir / ".hydra" / "config.yaml").is_file():
            restore_saved_config(config, resume_dir, announce=rank_zero)
        try:
            path, checkpoint = read_same_network(ckpt_path, config, "ckpt_path", prefer="last")
        except UserError:  # a run dir killed before its first checkpoint (it has its record) starts again in it
            if not (in_place and Path(ckpt_path).is_dir() and (resume_dir / ".hydra").is_dir()
                    and not (resume_dir / "metrics.json").exists() and not any(resume_dir.rglob("*.ckpt"))):
                raise
            if rank_zero:
                print(f"[pixelcnn] {resume_dir} has no checkpoint (it stopped before its first one): training it "
                      "from the start, with its saved config", flush=True)
            path = None
        if path is not None and in_place and rank_zero and (reason := finished_run(resume_dir, checkpoint, config.trainer)):
            print(f"[pixelcnn] {resume_dir} has already finished ({reason}); nothing was changed", flush=True)
            sys.exit(0)
        with read_write(config):
            config.ckpt_path = str(path) if path is not None else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_on_user_error():
            check_run_dir(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir", resuming=False)
        # Each job is composed from the sweep's overrides: the paths it does not sweep go in absolute.
        task = [str(o) for o in config.hydra.overrides.task]
        swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
        swept |= set(OmegaConf.select(config, "hydra.sweeper.params") or {})
        paths = {k: p for k, p in absolute_paths(config).items() if k not in swept and p != OmegaConf.select(config, k)}
        kept = [o for o in task if o.lstrip("+~").partition("=")[0] not in paths]
        with read_write(config.hydra.overrides):  # as_override without the shell's quotes: Hydra's
            config.hydra.overrides.task = kept + [shlex.split(as_override(key, path))[0] for key, path in paths.items()]


class SweepPrecheck(Callback):
    """Checks every job of a sweep before any trains (`sweep_check.sweep_errors`): bad jobs get
    one `error:` line each and the sweep stops with exit status 2, before its dir is created."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if errors := sweep_errors(config):
            print("\n".join(errors), file=sys.stderr, flush=True)
            # SystemExit passes through Hydra's callback and error handling (they catch Exception).
            raise SystemExit(2)


class SweepSummary(Callback):
    """When a sweep ends: its summary (`sweep.write_summary`), then exit status 1 if any job
    failed. If the sweep ends early instead (Ctrl-C, or the Optuna sweeper's error when every
    trial failed: "No trials are completed yet"), the summary of the jobs so far is written at exit.
    An Optuna sweep with a storage is recorded in its study first (`sweep.start_study_sweep`), so
    that the summary lists every trial of the study, continued or not."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_on_user_error(cleanup_dir=config.hydra.sweep.dir):  # e.g. a study DB that is not one
            start_study_sweep(config)
        atexit.register(self.write_at_exit, config)  # Hydra calls no callback when the sweep raises

    @staticmethod
    def write_at_exit(config: DictConfig) -> None:
        if Path(config.hydra.sweep.dir).is_dir():
            write_summary(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.write_at_exit)
        if failed := write_summary(config):
            print(f"error: {failed} jobs failed (see {Path(config.hydra.sweep.dir) / 'summary.md'})",
                  file=sys.stderr, flush=True)
            # SystemExit passes through Hydra's callback and error handling (they catch Exception).
            raise SystemExit(1)
