"""Train a PixelCNN: `python train.py [overrides]`, e.g. `python train.py model.residual_blocks=3`,
`python train.py experiment=quick`, `python train.py -m optim.lr=1e-4,5e-4`. See README.md."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pixelcnn.commands import train as command
from pixelcnn.commands.cli import run_app


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's best val bits/dim, the value a sweeper (hparams_search=optuna) minimizes."""
    return command.main(cfg)


if __name__ == "__main__":
    run_app(main, Path(__file__).parent / "conf", "train")
