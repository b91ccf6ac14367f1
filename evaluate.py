"""Evaluate a trained model: `python evaluate.py ckpt=<file or run dir>` (test bits/dim, NLL
heatmaps, most/least likely test images, sample quality), or score any images as outliers:
`python evaluate.py ckpt=... images=<file.npy | folder of PNGs>`. See conf/entry/evaluate.yaml."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pixelcnn.commands import evaluate as command
from pixelcnn.commands.cli import check_command_line, exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf/entry", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        command.main(cfg)


if __name__ == "__main__":
    check_command_line(sys.argv, Path(__file__).parent / "conf/entry")
    main()
