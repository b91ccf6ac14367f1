"""Train the sample-quality classifier and cache it beside the data cache:
`python train_classifier.py [epochs=5]`. `evaluate.py` trains it on first use if it is missing,
so this is only needed to retrain. See conf/entry/classifier.yaml."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pixelcnn.commands import train_classifier as command
from pixelcnn.commands.cli import exit_on_user_error, run_app


@hydra.main(version_base="1.3", config_path="conf/entry", config_name="classifier")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        command.main(cfg)


if __name__ == "__main__":
    run_app(main, Path(__file__).parent / "conf/entry", "classifier")
