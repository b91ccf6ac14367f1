"""Train a PixelCNN: `python train.py [overrides]`, e.g. `python train.py model.residual_blocks=3`,
`python train.py experiment=quick`, `python train.py -m optim.lr=1e-4,5e-4`. See README.md."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pixelcnn.commands import train as command
from pixelcnn.commands.cli import check_command_line


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's best val bits/dim, the value a sweeper (hparams_search=optuna) minimizes."""
    return command.main(cfg)


if __name__ == "__main__":
    check_command_line(sys.argv, Path(__file__).parent / "conf")
    main()
