"""A sweep's results: each job's `metrics.json` (written as the job ends, ok or failed) and, when
the sweep ends (`write_summary`, from the train command's SweepSummary callback), one summary of
its jobs in the sweep dir: `summary.md` (jobs ranked by best val bits/dim, failed ones with their
reason), `summary.png` (best val bits/dim against each swept parameter) and the best parameters in
`optimization_results.yaml`. Jobs that differ only in their seeds (`SEED_KEYS`) are one
configuration, ranked by its mean over seeds. An Optuna sweep with a storage summarizes every trial
of its study, which the same command continues (`start_study_sweep`)."""

from __future__ import annotations

import json
import math
import statistics
from contextlib import suppress
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, read_write

from pixelcnn.ops.errors import UserError, failure_reason
from pixelcnn.ops.rules import check_sqlite
from pixelcnn.ops.files import atomic_write, write_bytes

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
SEED_KEYS = ("seed", "data.split_seed")  # jobs differing only in these are repeats of one configuration
# The metrics aggregated over seeds: key in metrics.json -> column title.
AGGREGATED = {"val_bpd": "best val bits/dim", "test_bpd": "test bits/dim", "frechet_distance": "Fréchet distance"}
SWEEP_ATTR = "pixelcnn sweep dir "  # an Optuna study's user attribute: this prefix + a sweep dir -> its first trial


def parse_value(text: str) -> int | float | str:
    """An override's value as a number where it is one (for sorting and plotting)."""
    for kind in (int, float):
        with suppress(ValueError):
            return kind(text)
    return text


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Read every job of a sweep from disk (works whatever launcher ran the jobs). Each run has
    `job` (Hydra's job number), `params` (override key -> value), `status` ("ok" or "failed") and,
    when the job wrote them, its metrics. A damaged file of a job's record is named in its row."""
    runs = []
    for overrides_file in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        job = _read(job_dir / ".hydra" / "hydra.yaml", yaml.safe_load)
        for key in ("hydra", "job", "num"):
            job = job.get(key) if isinstance(job, dict) else None
        metrics_file = job_dir / "metrics.json"
        if not isinstance(metrics := _read(metrics_file, json.loads), dict):  # none yet, or a damaged file
            metrics = {"status": "failed", "error": "its metrics.json is damaged (not a JSON mapping)"
                       if metrics_file.is_file() else "no metrics.json: the job was killed or is still running"}
        if metrics.get("status", "ok") == "ok" and not _number(metrics.get("val_bpd")):
            metrics = {**metrics, "status": "failed", "error": "no best val bits/dim: did validation run?"}
        overrides = _read(overrides_file, yaml.safe_load)
        overrides = [str(o) for o in overrides] if isinstance(overrides, list) else ["(damaged .hydra/overrides.yaml)"]
        params = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
        runs.append({"job": job if type(job) is int else None, "dir": str(job_dir.relative_to(sweep_dir)),
                     "params": params, "overrides": " ".join(overrides) or "(defaults)", "status": "ok", **metrics})
    return sorted(runs, key=lambda r: (r["job"] is None, r["job"] or 0, r["dir"]))


def _read(path: Path, parse) -> Any:
    """A file of a job's record as plain data (None where it cannot be read): `yaml.safe_load` and `json.loads`
    build no object, and an interpolation stays text (OmegaConf.load would run its resolver, which can make folders)."""
    with suppress(OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):  # ValueError: JSONDecodeError
        return parse(path.read_text())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def swept_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs, in the order they appear."""
    keys = list(dict.fromkeys(k for run in runs for k in run["params"]))
    return [k for k in keys if len({run["params"].get(k) for run in runs}) > 1]


def seed_groups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's configurations over seeds, best first (lowest mean best val bits/dim; those
    with no ok job last), if some jobs differ only in their seeds; else []. Each has `config`
    (the swept non-seed overrides), `params`, `runs`, `seeds`, and per AGGREGATED metric the mean,
    std (None below 2 values) and count over its ok runs."""
    swept = swept_keys(runs)
    config_keys = [k for k in swept if k not in SEED_KEYS]
    groups: dict[tuple, list[dict[str, Any]]] = {}  # the configuration's (key, value) pairs -> its jobs
    for run in runs:
        groups.setdefault(tuple((k, run["params"][k]) for k in config_keys if k in run["params"]), []).append(run)
    if len(groups) == len(runs):  # no seed was repeated: nothing to aggregate
        return []
    result = []
    for config, members in groups.items():
        values = {key: [r[key] for r in members if r["status"] == "ok" and _number(r.get(key))] for key in AGGREGATED}
        result.append({"config": " ".join(f"{k}={v}" for k, v in config) or "(all jobs)", "params": dict(config),
                       "runs": members,
                       "seeds": " ".join(_params_text(r, [k for k in swept if k in SEED_KEYS]) for r in members),
                       **{key: (statistics.fmean(v) if v else None, statistics.stdev(v) if len(v) > 1 else None, len(v))
                          for key, v in values.items()}})
    return sorted(result, key=lambda g: (g["val_bpd"][0] is None, g["val_bpd"][0] or 0.0))


def _mean_std(stat: tuple[float | None, float | None, int]) -> str:
    mean, std, n = stat
    return "-" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f" (n={n})"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table; a `|` inside a cell (an error message's) becomes `/`."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]


def seed_table(groups: list[dict[str, Any]]) -> list[str]:
    """summary.md's table of configurations over seeds (mean ± std and count of ok seeds; failed
    seeds counted and named, never averaged in)."""
    metrics = [k for k in AGGREGATED if any(g[k][2] for g in groups) or k != "frechet_distance"]
    rows = []
    for i, group in enumerate(groups, 1):
        failed = [r for r in group["runs"] if r["status"] != "ok"]
        named = "; ".join(f"job {r['job']} ({_params_text(r, list(SEED_KEYS))}): {r.get('error') or 'unknown reason'}"
                          for r in failed)
        rows.append([i if group["val_bpd"][0] is not None else "-", group["config"], group["seeds"],
                     *(_mean_std(group[k]) for k in metrics), f"{len(failed)}{': ' + named if named else ''}"])
    return ["## Configurations over seeds", "",
            f"Jobs that differ only in {' / '.join(SEED_KEYS)}, ranked by the mean best val bits/dim over their "
            "ok seeds (mean ± sample standard deviation, n = ok seeds); a failed seed is named, not averaged in.", "",
            *_table(["rank", "configuration", "seeds", *(AGGREGATED[k] for k in metrics), "failed"], rows)]


def summary_table(runs: list[dict[str, Any]]) -> str:
    """summary.md: jobs ranked by best val bits/dim, failed ones last with their reason; above
    them, when jobs repeat a configuration with other seeds, the configurations ranked by mean."""
    swept, groups = swept_keys(runs), seed_groups(runs)
    common = [f"{k}={v}" for k, v in (runs[0]["params"].items() if runs else []) if k not in swept]
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["val_bpd"])
    failed = [r for r in runs if r["status"] != "ok"]
    study = any("trial" in run for run in runs)  # study_runs: every trial of an Optuna study, from its sweeps
    lines = [f"{len(runs)} jobs: {len(ok)} ok, {len(failed)} failed."]
    if groups and groups[0]["val_bpd"][0] is not None:
        lines.append(f"Best configuration: {groups[0]['config']}, best val {_mean_std(groups[0]['val_bpd'])} "
                     "bits/dim over seeds.")
    if ok:
        lines.append(f"Best: job {_job(ok[0])} ({_params_text(ok[0], swept)}), best val {ok[0]['val_bpd']:.4f} bits/dim"
                     + (f" (trial {ok[0]['trial']}, sweep {ok[0].get('sweep') or '?'})." if study else "."))
    lines += [f"Overrides of every job: {' '.join(common) or '(none)'}", ""]
    if groups:
        lines += seed_table(groups) + ["", "## Jobs", ""]
    header = ["rank", *(["trial", "sweep"] if study else []), "job", "overrides", "best val bits/dim",
              "test bits/dim", "epochs", "parameters", "status"]
    lines += _table(header, [[rank, *([run["trial"], run.get("sweep") or "?"] if study else []), _job(run),
                              _params_text(run, swept), _bpd(run.get("val_bpd")), _bpd(run.get("test_bpd")),
                              run.get("epochs", ""), run.get("parameters", ""),
                              "ok" if run["status"] == "ok" else f"failed: {run.get('error') or 'unknown reason'}"]
                             for rank, run in [*enumerate(ok, 1), *(("-", r) for r in failed)]])
    return "\n".join(lines) + "\n"


def _bpd(value: Any) -> str:
    return f"{value:.4f}" if _number(value) else "-"


def _job(run: dict[str, Any]) -> str:
    return str(run["job"]) if run["job"] is not None else "?"


def _params_text(run: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={run['params'][k]}" for k in keys if k in run["params"]) or run["overrides"]


def best_results(runs: list[dict[str, Any]], sweeper: str) -> dict[str, Any] | None:
    """The best job's swept parameters and value, in the Optuna sweeper's optimization_results.yaml
    format (so every sweep has its best in the same file); None if no job succeeded. Over seeds:
    the best configuration's parameters and its mean (with its std and ok jobs)."""
    if not (ok := [r for r in runs if r["status"] == "ok"]):
        return None
    if groups := seed_groups(runs):  # with an ok job, the first configuration has a mean
        mean, std, n = groups[0]["val_bpd"]
        return {"name": sweeper, "best_params": {k: parse_value(v) for k, v in groups[0]["params"].items()},
                "best_value": mean, "best_value_std": std, "best_value_n": n,
                "best_jobs": [r["job"] for r in groups[0]["runs"] if r["status"] == "ok"]}
    best = min(ok, key=lambda r: r["val_bpd"])
    return {"name": sweeper, "best_params": {k: parse_value(best["params"][k]) for k in swept_keys(runs)
                                             if k in best["params"]},
            "best_value": best["val_bpd"], "best_job": best["job"], "best_dir": best["dir"]}


def plot(runs: list[dict[str, Any]], path: Path) -> list[str]:
    """summary.png: one panel per swept parameter, best val bits/dim of each ok job against the
    parameter's value (log axis for a learning rate and for positive numbers spanning 20x or more; categories
    for text). Over seeds, one panel per non-seed parameter: each seed's point and each
    configuration's mean ± std. Failed jobs are not plotted; the panel title counts them. Returns
    the panels' titles (none, and no file, if nothing can be plotted)."""
    from matplotlib.figure import Figure  # not pyplot: a file only, no backend or display (servers, SLURM nodes)

    swept, ok = swept_keys(runs), [r for r in runs if r["status"] == "ok"]
    if not swept or not ok:
        return []
    groups = [g for g in seed_groups(runs) if g["val_bpd"][0] is not None]
    # Over seeds only (e.g. -m seed=0,1,2): one panel with the single configuration.
    keys = ([k for k in swept if k not in SEED_KEYS] or ["configuration"]) if groups else swept
    failed = len(runs) - len(ok)
    columns, rows = min(len(keys), 4), math.ceil(len(keys) / min(len(keys), 4))
    fig = Figure(figsize=(4 * columns, 3.5 * rows))
    for i, key in enumerate(keys, 1):
        ax = fig.add_subplot(rows, columns, i)
        shown = [r for r in ok if key in r["params"] or key == "configuration"]
        # The jobs' values, then the configurations' (both have `params`).
        xs = [parse_value(item["params"].get(key, "(all jobs)")) for item in shown + groups]
        if not all(isinstance(value, (int, float)) for value in xs):
            xs = [str(value) for value in xs]  # text: matplotlib's categories, in the sweep's order
            ax.tick_params("x", labelrotation=30)
        elif min(xs) > 0 and (key.endswith("lr") or max(xs) / min(xs) >= 20):
            ax.set_xscale("log")
            ax.tick_params("x", which="minor", labelbottom=False)  # minor labels overlap on short spans
        ax.plot(xs[:len(shown)], [r["val_bpd"] for r in shown], "o", alpha=0.4 if groups else 1.0,
                label="one seed" if groups else None)
        if groups:
            ax.errorbar(xs[len(shown):], [g["val_bpd"][0] for g in groups],
                        yerr=[g["val_bpd"][1] or 0.0 for g in groups], fmt="s", color="C1", capsize=4,
                        label="mean ± std over seeds")
            ax.legend(fontsize=7)
        ax.set(xlabel=key, ylabel="best val bits/dim")
        ax.set_title(key + (f" ({failed} failed job{'s' * (failed > 1)} not shown)" if failed else ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as file:
        fig.savefig(file, dpi=100, format="png")
    return [ax.get_title() for ax in fig.axes]


def open_study(config: DictConfig):
    """The Optuna study of this sweep (created if new), or None: another sweeper, or a study kept in
    memory (hydra.sweeper.storage=null)."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != OPTUNA_SWEEPER or not sweeper.get("storage"):
        return None
    import optuna

    if (storage := str(sweeper.storage)).startswith("sqlite:///"):  # SQLite creates the file but not its folder
        check_sqlite(database := storage.removeprefix("sqlite:///"), "hydra.sweeper.storage", "studies")
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    from sqlalchemy.exc import SQLAlchemyError  # Optuna's storage layer

    try:  # What the sweeper then does: it finds this study. One direction: the jobs return one value (val bits/dim).
        return optuna.create_study(study_name=sweeper.study_name, storage=storage, load_if_exists=True,
                                   direction=getattr(sweeper.direction, "name", str(sweeper.direction)))
    except (SQLAlchemyError, RuntimeError, ValueError) as err:  # RuntimeError: a schema of another Optuna version
        raise UserError(f"hydra.sweeper.storage={storage} cannot hold the study: {failure_reason(err)}") from None


def start_study_sweep(config: DictConfig) -> None:
    """Before an Optuna sweep with a storage: record in the study the sweep dir and the number of
    its first trial (so summary.md can list every trial with its sweep and job). A study that
    already has trials is continued: the sampler's seed is offset by their count, or the sampler
    would make the first sweep's random start-up suggestions again."""
    if (study := open_study(config)) is None:
        return
    first = len(study.trials)
    study.set_user_attr(SWEEP_ATTR + str(Path(config.hydra.sweep.dir).resolve()), first)
    if not first:
        return
    if (seed := OmegaConf.select(config, "hydra.sweeper.sampler.seed")) is not None:
        with read_write(config.hydra.sweeper.sampler):
            config.hydra.sweeper.sampler.seed = seed + first
    print(f"[pixelcnn] continuing the Optuna study '{study.study_name}' ({first} trials so far) in "
          f"{config.hydra.sweeper.storage}" + (f", sampler seed {seed} + {first}" if seed is not None else "")
          + "; hydra.sweeper.study_name=<another name> starts a new study", flush=True)


def study_sweeps(study) -> list[tuple[int, Path]]:
    """(first trial, sweep dir) of each sweep that added trials to `study` (start_study_sweep), in order."""
    return sorted((first, Path(key[len(SWEEP_ATTR):])) for key, first in study.user_attrs.items()
                  if key.startswith(SWEEP_ATTR) and isinstance(first, int))  # a study's attrs are data too


def study_runs(study) -> list[dict[str, Any]]:
    """Every trial of an Optuna `study`, as collect_runs gives a job, plus `trial` and `sweep`
    (1 = the study's first sweep): the job's own record where its sweep dir still holds it, else
    what the study knows. A trial's state decides: only a complete one is ok."""
    jobs = {first + run["job"]: {**run, "sweep": n, "dir": str(sweep_dir / run["dir"])}
            for n, (first, sweep_dir) in enumerate(study_sweeps(study), 1)  # a moved sweep dir: no jobs
            for run in collect_runs(sweep_dir) if run["job"] is not None}
    runs = []
    for trial in study.trials:
        run = jobs.get(trial.number)
        # Two sweeps of one study at the same time interleave their trials: a job counts only if its values match.
        if run is None or any(parse_value(run["params"].get(k, "")) != v for k, v in trial.params.items()):
            run = {"job": None, "dir": "", "params": {k: str(v) for k, v in trial.params.items()},
                   "overrides": " ".join(f"{k}={v}" for k, v in trial.params.items()), "status": "ok",
                   "val_bpd": trial.value}
        if (state := trial.state.name) != "COMPLETE":
            error = ((run.get("error") or "the trial failed") if state == "FAIL"
                     else f"trial {state.lower()}: its sweep ended before it did")
            run = {**run, "status": "failed", "error": error}
        runs.append({**run, "trial": trial.number})
    return runs


def write_summary(config: DictConfig) -> int:
    """Write summary.md, summary.png and (unless the sweeper wrote it) optimization_results.yaml
    into the sweep dir of `config`; print the table; return the number of failed jobs of this
    sweep. An Optuna sweep with a storage summarizes every trial of its study."""
    sweep_dir = Path(config.hydra.sweep.dir)
    if not sweep_dir.is_dir():  # the sweep ended (at exit: SweepSummary) before it made its dir: nothing to summarize
        return 0
    runs = this_sweep = collect_runs(sweep_dir)
    table = ""
    if (study := open_study(config)) is not None:
        runs = study_runs(study)
        sweeps = [f"{n} = {path}" + (" (this one)" if path == sweep_dir.resolve() else "")
                  for n, (_, path) in enumerate(study_sweeps(study), 1)]
        table = (f"Optuna study '{study.study_name}' ({config.hydra.sweeper.storage}): all its trials, from each sweep "
                 f"that added some: {'; '.join(sweeps)}.\n\n")
    table += summary_table(runs)
    if plot(runs, sweep_dir / "summary.png"):
        table += "\n![best val bits/dim against each swept parameter](summary.png)\n"
    write_bytes(sweep_dir / "summary.md", table.encode())
    results_file = sweep_dir / "optimization_results.yaml"  # where the Optuna sweeper writes its best trial
    sweeper = str(config.hydra.sweeper._target_).rsplit(".", 1)[-1]
    if not results_file.exists() and (best := best_results(runs, sweeper)) is not None:
        write_bytes(results_file, OmegaConf.to_yaml(best).encode())
    print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
    return sum(r["status"] != "ok" for r in this_sweep)
