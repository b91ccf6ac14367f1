"""`train.py` with a recorder of the training batches each DDP rank sees, for tests/test_ddp.py.

Lightning starts the other ranks by re-running this script, so they record too: every rank
saves the images of each epoch's batches to `$PIXELCNN_PROBE_DIR/rank<R>-epoch<E>.pt`.
"""

import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (the entry point, from the repository root)
from pixelcnn import training  # noqa: E402


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self.images.append(batch[0].cpu())

    def on_train_epoch_end(self, trainer, module) -> None:
        path = Path(os.environ["PIXELCNN_PROBE_DIR"]) / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.pt"
        torch.save({"images": torch.cat(self.images), "batches": trainer.num_training_batches}, path)
        self.images = []


build_callbacks = training.build_callbacks
training.build_callbacks = lambda *args: [*build_callbacks(*args), BatchRecorder()]

if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")(train.main.__wrapped__)()
