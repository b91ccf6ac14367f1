"""Lightning's own Trainer knobs, typed as in any Lightning project (`trainer.precision`,
`+trainer.overfit_batches`, `+trainer.val_check_interval`, `+trainer.fast_dev_run`), behave as
in Lightning through the project's own loader.
Each test fits a tiny model on small IDX files through the real builders of `pixelcnn.training`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch

from fakes import write_dataset
from pixelcnn.ops.rules import validate
from pixelcnn.ops.resources import resolve_speed
from pixelcnn.training import build_datamodule, build_module, build_trainer
from test_cli import NO_QUALITY, TINY, compose_train, data_args, run


class BatchSpy(L.Callback):
    """The training images of each epoch's batches, and the
    optimizer step and size of every validation batch outside the sanity check."""

    def __init__(self):
        self.train: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.val: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self.train[trainer.current_epoch].append(batch[0].clone())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, len(batch[0])))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("knobs")
    write_dataset(path / "data", n_train=100, n_test=20)  # 80 training images: 5 batches of 16
    return path


def fit(data_dir: Path, tmp_path: Path, *overrides: str) -> tuple[BatchSpy, L.Trainer]:
    cfg = compose_train(*TINY, *data_args(data_dir), "trainer.accelerator=cpu", "data.eval_batch_size=5",
                        "trainer.limit_train_batches=null", *overrides)
    validate(cfg, "train")
    datamodule = build_datamodule(cfg)
    datamodule.setup()  # as train() does: the module takes the data's classes and fingerprints
    speed = resolve_speed(cfg)
    spy = BatchSpy()
    trainer = build_trainer(cfg, speed, False, [spy], tmp_path, {})
    trainer.fit(build_module(cfg, speed, datamodule), datamodule=datamodule)
    return spy, trainer


def test_overfit_batches_trains_on_the_same_batches_every_epoch(data_dir: Path, tmp_path: Path):
    """+trainer.overfit_batches=2: each epoch trains on the training set's first 2 batches, in order
    and unflipped (data.hflip=true is on), and validates on the first 2 val batches, as Lightning does."""
    spy, _ = fit(data_dir, tmp_path, "+trainer.overfit_batches=2", "trainer.max_epochs=3", "data.hflip=true")
    epochs = [torch.cat(spy.train[epoch]) for epoch in range(3)]
    train_images = torch.load(data_dir / "data" / "fashion_mnist_16px_4lv.pt")  # the cache the data module wrote
    datamodule = build_datamodule(compose_train(*TINY, *data_args(data_dir)))
    datamodule.setup()
    assert epochs[0].shape[0] == 32 and len(train_images["train_images"]) == 100
    assert all(torch.equal(epoch, datamodule.train_set[0][:32]) for epoch in epochs)
    assert [size for _, size in spy.val] == [5, 5] * 3  # 2 val batches of data.eval_batch_size per epoch


@pytest.mark.parametrize("interval, limit, expected", [
    (2, 4, [2, 4]),  # every 2 batches (optimizer steps)
    (0.5, 4, [2, 4]),  # half an epoch
    (4, 8, [4, 8]),
])
def test_val_check_interval_counts_batches(data_dir: Path, tmp_path: Path, interval, limit: int, expected: list[int]):
    spy, _ = fit(data_dir, tmp_path, f"+trainer.val_check_interval={interval}", "trainer.max_epochs=1",
                 f"trainer.limit_train_batches={limit}", "data.batch_size=8")
    assert sorted({step for step, _ in spy.val}) == expected


@pytest.mark.parametrize("precision, used", [("32-true", "32-true"), ("bf16-mixed", "bf16-mixed"),
                                             ("16-mixed", "bf16-mixed")])  # Lightning: no fp16 AMP on a CPU
def test_precision_is_lightnings(data_dir: Path, tmp_path: Path, precision: str, used: str):
    _, trainer = fit(data_dir, tmp_path, f"trainer.precision={precision}", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=2")
    assert trainer.precision == used and trainer.global_step == 2


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_a_true_precision_trains_samples_and_scores_in_its_dtype(data_dir: Path, tmp_path: Path, precision: str,
                                                                 dtype: torch.dtype):
    """Lightning casts the weights to the dtype (not the uint8 batch): the model input follows the weights. Was a
    dtype mismatch in the first forward pass, though the rule accepted these precisions."""
    _, trainer = fit(data_dir, tmp_path, f"trainer.precision={precision}", "trainer.max_epochs=1",
                     "trainer.limit_train_batches=2")
    module = trainer.lightning_module
    assert trainer.global_step == 2 and next(module.parameters()).dtype == dtype
    assert torch.isfinite(module.nll_maps(*trainer.datamodule.test_set)).all()
    for method in ("fast", "naive"):  # the sample grids of training, and sample.py's reference sampler
        assert module.sample(2, method=method).shape == (2, 16, 16)


@pytest.mark.parametrize("overrides, refused", [
    (["trainer.limit_train_batches=0.01"], "You requested to check 0.01 of the `train_dataloader` but 0.01 * 5 < 1"),
    (["+trainer.val_check_interval=50"], "`val_check_interval` (50) must be less than or equal to the number of the "
                                         "training batches (5)"),
    (["trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=3", "trainer.max_epochs=2"], None),
    (["trainer.limit_test_batches=0"], None),  # Lightning skips the test: no test bits/dim (was an IndexError)
])
def test_limits_and_intervals_lightning_refuses_for_this_data_are_one_line(data_dir: Path, tmp_path: Path,
                                                                           overrides: list[str], refused: str | None):
    """Lightning checks them against the data's batches as its loops start: its refusal was an unforeseen error.
    check_val_every_n_epoch=null (validate every val_check_interval batches across epochs) is Lightning's own."""
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(data_dir), "trainer.limit_train_batches=null",
                 *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    if refused:
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"error: the trainer settings do not fit this data: {refused}" + result.stderr.strip().split(refused)[1]]
        assert not (tmp_path / "run").exists()
        return
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    if "trainer.limit_test_batches=0" in overrides:
        assert metrics["test_bpd"] is None and metrics["val_bpd"] > 0
    else:  # 10 batches in 2 epochs of 5: validations after batches 3, 6 and 9, the second epoch's across its start
        assert len(list((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))) >= 1 and metrics["epochs"] == 2


def test_fast_dev_run_reports_no_validation_score(data_dir: Path):
    run_dir = data_dir / "outputs" / "fast-dev-run"
    result = run("train.py", *TINY, *NO_QUALITY, *data_args(data_dir), "+trainer.fast_dev_run=true",
                 f"hydra.run.dir={run_dir}", cwd=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if "test" in line and "bits/dim" in line]
    assert "nan" not in result.stdout
    assert line.startswith("[pixelcnn] fast_dev_run (1 batch per loop): no validation score, so no best checkpoint")
    assert not list(run_dir.glob("checkpoints/best-*.ckpt"))  # Lightning keeps no score under fast_dev_run
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1
