"""Benchmark training and sampling on the present device: `python bench.py [overrides]`.
Prints one table and writes it as JSON (the `bench.out` key: bench.json). See README.md, section Performance."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pixelcnn.commands import bench as command
from pixelcnn.commands.cli import exit_on_user_error, run_app


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        command.main(cfg)


if __name__ == "__main__":
    run_app(main, Path(__file__).parent / "conf", "bench")
