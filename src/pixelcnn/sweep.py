"""A sweep's results: each job's `metrics.json` (written as the job ends, ok or failed) and, when
the sweep ends (`write_summary`, called by the train command's SweepSummary callback), one
summary of all jobs in the sweep dir: `summary.md` (jobs ranked by best val bits/dim, failed
ones with their reason), `summary.png` (best val bits/dim against each swept parameter) and the
best parameters in `optimization_results.yaml`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pixelcnn.files import atomic_write, write_text

RESULTS_FILE = "optimization_results.yaml"  # the name the Optuna sweeper writes its best trial to


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write `metrics` as JSON; a non-finite number becomes null (json.dumps would write NaN or
    Infinity, which is not JSON)."""
    def finite(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    write_text(path, json.dumps({k: finite(v) for k, v in metrics.items()}, indent=2, allow_nan=False))


def parse_value(text: str) -> int | float | str:
    """An override's value as a number where it is one (for sorting and plotting)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Read every job of a sweep from disk (works whatever launcher ran the jobs). Each run has
    `job` (Hydra's job number), `params` (override key -> value), `status` ("ok" or "failed") and,
    when the job wrote them, its metrics."""
    runs = []
    for overrides_file in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        hydra_file = job_dir / ".hydra" / "hydra.yaml"
        job = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num") if hydra_file.is_file() else None
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {
            "status": "failed", "error": "no metrics.json: the job was killed or is still running"}
        if metrics.get("status", "ok") == "ok" and not _number(metrics.get("val_bpd")):
            metrics = {**metrics, "status": "failed", "error": "no best val bits/dim: did validation run?"}
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        params = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
        runs.append({"job": job, "dir": str(job_dir.relative_to(sweep_dir)), "params": params,
                     "overrides": " ".join(overrides) or "(defaults)", "status": "ok", **metrics})
    return sorted(runs, key=lambda r: (r["job"] is None, r["job"] if r["job"] is not None else 0, r["dir"]))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def swept_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs, in the order they appear."""
    keys = list(dict.fromkeys(k for run in runs for k in run["params"]))
    return [k for k in keys if len({run["params"].get(k) for run in runs}) > 1]


def rank(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs best first (lowest val bits/dim), each ok run with its `rank` (1 = best); failed
    runs last, by job number."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["val_bpd"])
    return [{**r, "rank": i} for i, r in enumerate(ok, 1)] + [{**r, "rank": None} for r in runs if r["status"] != "ok"]


def summary_table(runs: list[dict[str, Any]]) -> str:
    """summary.md: jobs ranked by best val bits/dim, failed ones last with their reason."""
    def bpd(value: Any) -> str:
        return f"{value:.4f}" if _number(value) else "-"

    swept = swept_keys(runs)
    common = [f"{k}={v}" for k, v in (runs[0]["params"].items() if runs else []) if k not in swept]
    ranked = rank(runs)
    ok = [r for r in ranked if r["status"] == "ok"]
    lines = [f"{len(runs)} jobs: {len(ok)} ok, {len(runs) - len(ok)} failed."]
    if ok:
        best = ok[0]
        lines.append(f"Best: job {best['job']} ({_params_text(best, swept)}), best val {best['val_bpd']:.4f} bits/dim.")
    lines += [f"Overrides of every job: {' '.join(common) or '(none)'}", "",
              "| rank | job | overrides | best val bits/dim | test bits/dim | epochs | parameters | status |",
              "|---|---|---|---|---|---|---|---|"]
    for run in ranked:
        status = "ok" if run["status"] == "ok" else f"failed: {run.get('error') or 'unknown reason'}"
        lines.append(f"| {run['rank'] or '-'} | {run['job'] if run['job'] is not None else '?'} "
                     f"| {_params_text(run, swept)} | {bpd(run.get('val_bpd'))} | {bpd(run.get('test_bpd'))} "
                     f"| {run.get('epochs', '')} | {run.get('parameters', '')} | {status.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _params_text(run: dict[str, Any], swept: list[str]) -> str:
    return " ".join(f"{k}={run['params'][k]}" for k in swept if k in run["params"]) or run["overrides"]


def best_results(runs: list[dict[str, Any]], sweeper: str) -> dict[str, Any] | None:
    """The best job's swept parameters and value, in the Optuna sweeper's optimization_results.yaml
    format (so every sweep has its best in the same file); None if no job succeeded."""
    ok = rank(runs)[:1]
    if not ok or ok[0]["status"] != "ok":
        return None
    best = ok[0]
    return {"name": sweeper, "best_params": {k: parse_value(best["params"][k]) for k in swept_keys(runs)
                                             if k in best["params"]},
            "best_value": best["val_bpd"], "best_job": best["job"], "best_dir": best["dir"]}


def plot(runs: list[dict[str, Any]], path: Path) -> list[str]:
    """summary.png: one panel per swept parameter, best val bits/dim of each ok job against the
    parameter's value (log axis for a learning rate and for positive numbers spanning 20x or more; categories
    for text). Failed jobs are not plotted; the panel title counts them. Returns the panels'
    titles (none, and no file, if nothing can be plotted)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, SLURM nodes)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    swept, ok = swept_keys(runs), [r for r in runs if r["status"] == "ok"]
    if not swept or not ok:
        return []
    failed = len(runs) - len(ok)
    columns = min(len(swept), 4)
    rows = math.ceil(len(swept) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(swept):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, swept):
        points = [(parse_value(r["params"][key]), r["val_bpd"]) for r in ok if key in r["params"]]
        numeric = all(isinstance(x, (int, float)) for x, _ in points)
        if numeric:
            xs = [x for x, _ in points]
            if min(xs) > 0 and (key.endswith("lr") or max(xs) / min(xs) >= 20):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short spans
            ax.plot(xs, [y for _, y in points], "o")
        else:  # categories, in the order the sweep listed them
            categories = list(dict.fromkeys(str(x) for x, _ in points))
            ax.plot([categories.index(str(x)) for x, _ in points], [y for _, y in points], "o")
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_xlabel(key)
        ax.set_title(key + (f" ({failed} failed job{'s' * (failed > 1)} not shown)" if failed else ""), fontsize=9)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("best val bits/dim")
    fig.tight_layout()
    with atomic_write(path) as file:
        fig.savefig(file, dpi=100, format="png")
    plt.close(fig)
    return [ax.get_title() for ax in axes.flat[:len(swept)]]


def write_summary(config: DictConfig) -> int:
    """Write summary.md, summary.png and (unless the sweeper wrote it) optimization_results.yaml
    into the sweep dir of `config`; print the table; return the number of failed jobs."""
    sweep_dir = Path(config.hydra.sweep.dir)
    runs = collect_runs(sweep_dir)
    table = summary_table(runs)
    if plot(runs, sweep_dir / "summary.png"):
        table += "\n![best val bits/dim against each swept parameter](summary.png)\n"
    write_text(sweep_dir / "summary.md", table)
    results_file = sweep_dir / RESULTS_FILE
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="sweeper")).rsplit(".", 1)[-1]
    if not results_file.exists() and (best := best_results(runs, sweeper)) is not None:
        with atomic_write(results_file, "w") as file:
            OmegaConf.save(OmegaConf.create(best), file)
    print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
    return sum(r["status"] != "ok" for r in runs)
