"""Train the sample-quality classifier and cache it in the data dir:
`python train_classifier.py [data.root=data] [epochs=5]`. `evaluate.py` trains it on first use
if it is missing, so this is only needed to retrain. See conf/entry/classifier.yaml."""

import hydra
from omegaconf import DictConfig

from pixelcnn.cli import exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf/entry", config_name="classifier")
def main(cfg: DictConfig) -> None:
    from pixelcnn.classifier import run

    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    main()
