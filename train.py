"""Train a PixelCNN: `python train.py [overrides]`, e.g. `python train.py model.residual_blocks=3`,
`python train.py experiment=quick`, `python train.py -m model.lr=1e-4,5e-4`. See README.md."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pixelcnn.checkpoints import register_resolvers, with_resume_overrides
from pixelcnn.cli import exit_on_unknown_choice, exit_on_user_error, record_job_failure

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's best val bits/dim, the value a sweeper (hparams_search=optuna) minimizes."""
    from pixelcnn.training import train  # imported late so that `--help` and config errors are fast

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # a failing job is recorded; the other jobs still run
        with record_job_failure(cfg.output_dir, HydraConfig.get().job.num):
            return train(cfg)["val_bpd"]
        # Not NaN: with optuna 2.10 the Optuna sweeper crashes on a NaN value; a non-float marks the trial failed.
        return None
    # Removed after an input error only if this run created it (a resumed run's dir never is).
    with exit_on_user_error(cleanup_dir=cfg.output_dir):
        return train(cfg)["val_bpd"]


if __name__ == "__main__":
    exit_on_unknown_choice(sys.argv, Path(__file__).parent / "conf")
    sys.argv = with_resume_overrides(sys.argv)
    main()
