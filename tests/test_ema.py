"""model.ema_decay: an exponential moving average of the weights (Lightning's EMAWeightAveraging,
as `callbacks.WeightAverage`) is what validation, the final test and the checkpoints use, and a
resume continues it exactly. Tiny models through a real Trainer, as in test_training_knobs."""

from __future__ import annotations

from pathlib import Path

import json

import lightning as L
import torch
from commands import run_here
from test_cli import NO_QUALITY, TINY, data_args, run, workdir  # noqa: F401 - a fixture
from test_training_knobs import data, fit, tiny

from pixelcnn.ops.callbacks import WeightAverage
from pixelcnn.data import BatchLoader
from pixelcnn.likelihood import ImageModel


def loaders():
    images, labels = data(48)
    return BatchLoader(images, labels, 8), BatchLoader(images[:16], labels[:16], 16)


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
        fit(tiny(ema_decay=0.5), *loaders(),
            callbacks=[WeightAverage(decay=0.5, device="cpu"), SaveAtEpochEnd(tmp_path / name)],
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
    fit(tiny(ema_decay=0.5), *loaders(),
        callbacks=[WeightAverage(decay=0.5, device="cpu"), SaveAtEpochEnd(tmp_path / "e1.ckpt")],
        max_epochs=1)
    raw = torch.load(tmp_path / "e1.ckpt", weights_only=True)["current_model_state"]
    module = tiny()  # model.ema_decay=0 now: no average
    fit(module, *loaders(), max_epochs=1, ckpt_path=tmp_path / "e1.ckpt")  # restores, nothing left to train
    for name, value in module.state_dict().items():
        assert torch.equal(value, raw[name]), name


def test_train_py_reports_the_average_and_the_scripts_read_the_run(workdir: Path, tmp_path: Path):
    """model.ema_decay from the command line: the run's test bits/dim is its weight average's
    (scripts/ema_vs_raw.py scores both kinds of weights of its checkpoint), and scripts/val_curve.py
    draws its validations from the TensorBoard scalars."""
    run_dir = tmp_path / "run"
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(workdir), "model.ema_decay=0.5", "trainer.precision=32-true",
                 f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scored = run("scripts/ema_vs_raw.py", str(run_dir), "--data-root", str(workdir / "data"), cwd=workdir)
    assert scored.returncode == 0, scored.stderr[-2000:]
    average, raw = (float(scored.stdout.split(f"{kind} ")[1].split(",")[0]) for kind in ("average", "raw"))
    assert abs(average - metrics["test_bpd"]) < 1e-4 and average != raw
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["current_model_state"]  # as in a run without model.ema_decay
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    for path, message in ((tmp_path / "plain.ckpt", "holds no raw weights (current_model_state)"),
                          (tmp_path / "missing", "does not exist")):  # the checkpoint readers' own errors: one line
        refused = run_here("scripts/ema_vs_raw.py", str(path), cwd=workdir)
        [line] = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and line.startswith("error: ") and message in line, refused.stderr[-2000:]
    curve = run("scripts/val_curve.py", str(run_dir), "--out", str(tmp_path / "curve.png"), cwd=workdir)
    assert curve.returncode == 0, curve.stderr[-2000:]
    points = [line.split() for line in curve.stdout.splitlines() if line[:1].isdigit()]
    assert [int(epoch) for epoch, _ in points] == list(range(1, metrics["epochs"] + 1))  # one per epoch
    assert min(float(value) for _, value in points) == float(f"{metrics['val_bpd']:.5f}")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
