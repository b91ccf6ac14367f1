"""One run on several processes (DDP): a real 2-process run on the CPU (gloo), checked against
a single-process evaluation of its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fakes import write_dataset
from pixelcnn.ops.checkpoints import load_module
from pixelcnn.data import BatchLoader, setup_datamodule

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.filters=8", "model.residual_blocks=1", "data.batch_size=8", "data.eval_batch_size=4", "data.val_size=21",
    "data.download=false", "trainer.max_epochs=2", "sample.every_n_epochs=1", "sample.n=4", "quality_n=0",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


@pytest.mark.parametrize("count", [2, 7, 20, 21, 103])
@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
def test_ranks_get_disjoint_shares_in_equal_batch_counts(count: int, world_size: int, batch_size: int):
    """Same seed on every rank (as the data module arranges): training shares are disjoint,
    equal, and miss only the `count % world_size` remainder; evaluation covers every item once.
    Every rank has the same number of items per epoch (its __len__) either way."""
    if world_size > count:
        with pytest.raises(ValueError, match="does not fit"):
            BatchLoader(torch.zeros(count, 1, 2, 2), torch.arange(count), batch_size, rank=0, world_size=world_size)
        return
    for shuffle in (True, False):
        loaders = [BatchLoader(torch.zeros(count, 1, 2, 2), torch.arange(count), batch_size, shuffle=shuffle, seed=5,
                               rank=rank, world_size=world_size)
                   for rank in range(world_size)]
        for epoch in range(2):  # a new permutation each epoch, still cut alike on every rank
            items = [list(loader) for loader in loaders]
            assert len({len(i) for i in items} | {len(loader) for loader in loaders}) == 1  # same batch count
            batches = [labels_per_batch_of(i) for i in items]
            seen = [label for rank_batches in batches for batch in rank_batches for label in batch]
            assert len(seen) == len(set(seen))  # disjoint, nothing twice
            if shuffle:
                assert len(seen) == count // world_size * world_size
                assert all(len(b) <= batch_size for rank_batches in batches for b in rank_batches)
            else:
                assert sorted(seen) == list(range(count))  # evaluation: every item, so the mean is exact
                assert all(0 < len(b) <= batch_size + 1 for rank_batches in batches for b in rank_batches)


def labels_per_batch_of(items: list) -> list[list[int]]:
    return [labels.tolist() for _, labels in items]


def test_data_module_gives_each_rank_its_share_of_one_permutation(tmp_path: Path):
    """The rank and world size come from the trainer; the shuffling seed from rank 0 (broadcast),
    so that the ranks cut the same permutation whatever their global RNGs hold."""
    from pixelcnn.ops.errors import UserError

    write_dataset(tmp_path / "data", n_train=100, n_test=21)
    broadcasts = []

    def broadcast(value, src=0):
        broadcasts.append(value)
        return 1234  # what rank 0 drew

    for rank in range(2):
        dm = setup_datamodule(tmp_path / "data", 16, 4, val_size=1, system_dir=tmp_path / "none", download=False,
                              batch_size=8)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, overfit_batches=0, strategy=SimpleNamespace(
            root_device=torch.device("cpu"), broadcast=broadcast))
        train = dm.train_dataloader()
        assert (train.rank, train.world_size, train.generator.initial_seed()) == (rank, 2, 1234)
        assert (dm.test_dataloader().rank, dm.test_dataloader().world_size) == (rank, 2)
        with pytest.raises(UserError, match="the val split has 1 images, fewer than the 2 processes"):
            dm.val_dataloader()
    assert len(broadcasts) == 2


def test_two_processes_share_each_epoch_and_test_like_one(tmp_path: Path):
    """Training: the ranks' batches are disjoint and together the whole epoch (less the one image
    that 79 cannot share evenly), in the same number of batches. Val and test: 21 images, shares
    of 10 and 11, yet the logged bits/dim equal one process's over the same checkpoint."""
    data, probe, run_dir = tmp_path / "data", tmp_path / "probe", tmp_path / "run"
    write_dataset(data, n_train=100, n_test=21)
    probe.mkdir()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "PIXELCNN_PROBE_DIR": str(probe)}
    result = subprocess.run(
        # fp32: the bits/dim are compared with an fp32 evaluation below (auto is bf16 on CPUs with native bf16).
        [sys.executable, str(ROOT / "tests" / "ddp_probe.py"), *TINY, *DDP, "trainer.precision=32-true", f"data.root={data}",
         f"data.system_dir={tmp_path / 'none'}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[pixelcnn] run dir:") == 1 and result.stdout.count("[pixelcnn] best val") == 1

    dm = setup_datamodule(data, 16, 4, val_size=21, system_dir=tmp_path / "none", download=False)
    train_rows = {row.numpy().tobytes() for row in dm.train_set[0].flatten(1)}
    assert len(train_rows) == 79  # distinct images, so an image stands for its index
    for epoch in range(2):
        seen = [torch.load(probe / f"rank{rank}-epoch{epoch}.pt") for rank in range(2)]
        rows = [[row.numpy().tobytes() for row in s["images"].flatten(1)] for s in seen]
        assert len(rows[0]) == len(rows[1]) == 39 and seen[0]["batches"] == seen[1]["batches"] == 5
        assert not set(rows[0]) & set(rows[1]) and set(rows[0]) | set(rows[1]) <= train_rows
        assert len(set(rows[0] + rows[1])) == 78

    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = load_module(metrics["best_checkpoint"])
    with torch.no_grad():
        test_bpd = best.mean_bits_per_dim(*dm.test_set).item()
        val_bpd = best.mean_bits_per_dim(*dm.val_set).item()
    assert metrics["test_bpd"] == pytest.approx(test_bpd, abs=1e-6)
    assert metrics["val_bpd"] == pytest.approx(val_bpd, abs=1e-6)
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


def test_a_sweep_with_several_devices_needs_slurm(tmp_path: Path):
    """Lightning would start the other ranks by re-running the command line, i.e. the sweep."""
    write_dataset(tmp_path / "data", n_train=100, n_test=21)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *TINY, *DDP, f"data.root={tmp_path / 'data'}",
         f"data.system_dir={tmp_path / 'none'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    # Each job fails as it starts (recorded as failed, the sweep exits 1 at the end); nothing trains.
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: job 0 failed: trainer.devices > 1 in a sweep (-m) needs processes started by SLURM" in result.stderr
    [metrics] = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("**/metrics.json")]
    assert metrics["status"] == "failed" and not list((tmp_path / "sweep").glob("**/*.ckpt"))


def test_devices_lightning_refuses_are_one_line(tmp_path: Path):
    from lightning.pytorch.loggers import CSVLogger

    from pixelcnn.ops.errors import UserError
    from pixelcnn.ops.resources import resolve_speed
    from pixelcnn.training import build_trainer
    from test_cli import compose_train

    cfg = compose_train("trainer.accelerator=cpu", "trainer.devices=[0,1]")  # CPUs are counted, not picked
    with pytest.raises(UserError, match=r"^the trainer settings do not fit this machine or each other: "
                                        r".*should be an int > 0.$"):
        build_trainer(cfg, resolve_speed(cfg), None, [], tmp_path, {})
    # Options that do not go together are named as such, not as devices that do not fit.
    cfg = compose_train("trainer.accelerator=cpu", "+trainer.barebones=true")
    with pytest.raises(UserError, match=r"^the trainer settings do not fit this machine or each other: .*barebones"):
        build_trainer(cfg, resolve_speed(cfg), [CSVLogger(tmp_path)], [], tmp_path, {})
