"""Evaluate a trained model: `python evaluate.py ckpt=<file or run dir>` (test bits/dim, NLL
heatmaps, most/least likely test images, sample quality), or score any images as outliers:
`python evaluate.py ckpt=... images=<file.npy | folder of PNGs>`. See conf/entry/evaluate.yaml."""

import gc
from pathlib import Path

# Start-up: the imports below (torch's above all) make ~200,000 objects that live until exit. No
# garbage collection walks them: none runs while importing, and then they are frozen (skipped by
# every later collection, the one at exit too). ~0.6 s of CPU less per start on a 2-core CPU
# (docs/performance.md).
gc.disable()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pixelcnn.commands import evaluate as command  # noqa: E402
from pixelcnn.commands.cli import exit_on_user_error, run_app  # noqa: E402

gc.freeze()
gc.enable()


@hydra.main(version_base="1.3", config_path="conf/entry", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        command.main(cfg)


if __name__ == "__main__":
    run_app(main, Path(__file__).parent / "conf/entry", "evaluate")
