"""Sample from a trained model: `python sample.py ckpt=<file or run dir> n=64 temperature=1.0`.
Only the checkpoint is needed. See README.md and conf/entry/sample.yaml for every option."""

import gc
from pathlib import Path

# Start-up: the imports below (torch's above all) make ~200,000 objects that live until exit. No
# garbage collection walks them: none runs while importing, and then they are frozen (skipped by
# every later collection, the one at exit too). ~0.6 s of CPU less per start on a 2-core CPU
# (docs/performance.md).
gc.disable()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pixelcnn.commands import sample as command  # noqa: E402
from pixelcnn.commands.cli import exit_on_user_error, run_app  # noqa: E402

gc.freeze()
gc.enable()


@hydra.main(version_base="1.3", config_path="conf/entry", config_name="sample")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        command.main(cfg)


if __name__ == "__main__":
    run_app(main, Path(__file__).parent / "conf/entry", "sample")
