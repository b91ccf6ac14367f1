"""model.ema_decay: an exponential moving average of the weights (Lightning's EMAWeightAveraging,
as `callbacks.WeightAverage`) is what validation, the final test and the checkpoints use, and a
resume continues it exactly. Tiny models through a real Trainer, as in test_training_knobs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from test_training_knobs import data, fit, tiny

from pixelcnn.callbacks import WeightAverage
from pixelcnn.data import BatchLoader
from pixelcnn.image_model import ImageModel


def loaders():
    images, labels = data(48)
    return BatchLoader(images, labels, 8, steps_per_batch=2), BatchLoader(images[:16], labels[:16], 16)


class SaveAtEpochEnd(L.Callback):
    """Saves the checkpoint as a run does, inside fit: once fit ends, Lightning's callback has copied
    the average over the raw weights."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def bits_per_dim(state_dict: dict, hparams: dict) -> float:
    """Mean bits/dim of the validation images under these weights (a Lightning-free model)."""
    model = ImageModel.from_hparams(hparams)
    model.load_state_dict(state_dict)
    images, labels = data(48)
    with torch.no_grad():
        return model.eval().mean_bits_per_dim(images[:16], labels[:16]).item()


def test_the_average_is_validated_tested_and_checkpointed(tmp_path: Path):
    module, average = tiny(ema_decay=0.5), WeightAverage(decay=0.5, device="cpu")
    train, val = loaders()
    trainer = fit(module, train, val, callbacks=[average, SaveAtEpochEnd(tmp_path / "last.ckpt")], max_epochs=2)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    raw, averaged = checkpoint["current_model_state"], checkpoint["state_dict"]
    assert not torch.equal(raw["net.to_logits.weight"], averaged["net.to_logits.weight"])
    hparams = checkpoint["hyper_parameters"]
    assert hparams["ema_decay"] == 0.5 and ImageModel.from_hparams(hparams)  # a training key: not the network's
    expected, raw_bpd = bits_per_dim(averaged, hparams), bits_per_dim(raw, hparams)
    assert abs(expected - raw_bpd) > 1e-4
    assert trainer.callback_metrics["val/bpd"].item() == torch.tensor(expected).item()  # validated: the average
    # The final test of a run loads its best checkpoint: the average, not the raw weights Lightning's
    # callback would restore there.
    tested = trainer.test(module, dataloaders=val, ckpt_path=tmp_path / "last.ckpt", weights_only=True, verbose=False)
    assert abs(tested[0]["test/bpd"] - expected) < 1e-6


def test_a_resume_continues_the_average_exactly(tmp_path: Path):
    def run(name: str, epochs: int, ckpt_path: Path | None = None) -> None:
        fit(tiny(ema_decay=0.5), *loaders(), callbacks=[WeightAverage(0.5, "cpu"), SaveAtEpochEnd(tmp_path / name)],
            max_epochs=epochs, ckpt_path=ckpt_path)

    run("straight.ckpt", 2)
    run("epoch1.ckpt", 1)
    run("resumed.ckpt", 2, ckpt_path=tmp_path / "epoch1.ckpt")
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("straight.ckpt", "resumed.ckpt"))
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_a_resume_without_the_average_continues_the_raw_weights(tmp_path: Path):
    fit(tiny(ema_decay=0.5), *loaders(), callbacks=[WeightAverage(0.5, "cpu"), SaveAtEpochEnd(tmp_path / "e1.ckpt")],
        max_epochs=1)
    raw = torch.load(tmp_path / "e1.ckpt", weights_only=True)["current_model_state"]
    module = tiny()  # model.ema_decay=0 now: no average
    fit(module, *loaders(), max_epochs=1, ckpt_path=tmp_path / "e1.ckpt")  # restores, nothing left to train
    for name, value in module.state_dict().items():
        assert torch.equal(value, raw[name]), name
