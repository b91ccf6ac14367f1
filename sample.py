"""Sample from a trained model: `python sample.py ckpt=<file or run dir> n=64 temperature=1.0`.
Only the checkpoint is needed. See README.md and conf/entry/sample.yaml for every option."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pixelcnn.commands import sample as command
from pixelcnn.commands.cli import check_command_line, exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf/entry", config_name="sample")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        command.main(cfg)


if __name__ == "__main__":
    check_command_line(sys.argv, Path(__file__).parent / "conf/entry")
    main()
