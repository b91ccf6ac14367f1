"""Benchmark training and sampling on the present device: `python bench.py [overrides]`.
Prints one table and writes it as JSON (the `bench.out` key: bench.json). See README.md, section Performance."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pixelcnn.checkpoints import register_resolvers
from pixelcnn.cli import exit_on_unknown_choice, exit_on_user_error

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    from pixelcnn.benchmark import main as bench

    with exit_on_user_error():
        bench(cfg)


if __name__ == "__main__":
    exit_on_unknown_choice(sys.argv, Path(__file__).parent / "conf")
    main()
