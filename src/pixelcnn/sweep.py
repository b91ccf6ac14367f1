"""A Hydra callback that writes one table for a whole sweep: overrides -> best val / test bits/dim."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Read every job of a sweep from disk (works whatever launcher ran the jobs)."""
    runs = []
    for overrides_file in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        runs.append({"overrides": " ".join(OmegaConf.load(overrides_file)) or "(defaults)",
                     "dir": str(job_dir.relative_to(sweep_dir)), **metrics})
    return runs


def format_table(runs: list[dict[str, Any]]) -> str:
    def bpd(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "failed"

    lines = ["| overrides | best val bits/dim | test bits/dim | epochs | parameters |", "|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: r.get("val_bpd", float("inf"))):
        lines.append(f"| {run['overrides']} | {bpd(run.get('val_bpd'))} | {bpd(run.get('test_bpd'))} "
                     f"| {run.get('epochs', '')} | {run.get('parameters', '')} |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = format_table(collect_runs(sweep_dir))
        (sweep_dir / "summary.md").write_text(table)
        print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
