"""The val bits/dim curve of one or more runs, read from their TensorBoard scalars, as a PNG.

    python scripts/val_curve.py RUN_DIR [RUN_DIR ...] --out docs/val_curve.png [--label NAME ...]

Each run dir's `tb/` holds the `val/bpd` scalar, logged once per validation (each epoch by default);
a resumed run appends to the same folder, so the curve covers the whole run. Prints each run's
points as `epoch val_bpd` lines too, and the best one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TAG = "val/bpd"


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, val bits/dim) of every validation of the run, in step order; the epoch is read from
    Lightning's `epoch` scalar logged at the same step (1-based), else counted."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    if TAG not in events.Tags()["scalars"]:
        raise SystemExit(f"error: {run_dir / 'tb'} holds no {TAG} scalar: is it a train.py run dir?")
    epochs = {e.step: int(e.value) + 1 for e in events.Scalars("epoch")} if "epoch" in events.Tags()["scalars"] else {}
    points = sorted((e.step, e.value) for e in events.Scalars(TAG))
    return [(epochs.get(step, i + 1), value) for i, (step, value) in enumerate(points)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.py run dirs (each with tb/)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--label", action="append", help="a legend label per run (default: the run dir's name)")
    parser.add_argument("--title", default="validation bits/dim per epoch")
    args = parser.parse_args()
    labels = args.label or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(labels)} --label for {len(args.runs)} runs: give one per run, or none")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for run, label in zip(args.runs, labels):
        curve = val_curve(run)
        epoch, best = min(curve, key=lambda point: point[1])
        print(f"# {label} ({run}): best {best:.4f} at epoch {epoch}\n" + "\n".join(f"{e} {v:.5f}" for e, v in curve))
        ax.plot([e for e, _ in curve], [v for _, v in curve], marker=".", label=f"{label} (best {best:.4f})")
    ax.set(xlabel="epoch", ylabel="val bits/dim", title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
