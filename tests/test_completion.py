"""Image completion: kept rows stay exact, the rest is the fast sampler's draw, and
`sample.py mode=complete` writes the figure and the levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from commands import run_here
from pixelcnn.ops.checkpoints import load_module
from pixelcnn.commands.sample import complete
from pixelcnn.commands.sample import main as sample_run
from pixelcnn.ops.errors import UserError
from pixelcnn.data import setup_datamodule
from pixelcnn.gated_net import GatedPixelCNN
from pixelcnn.pixelcnn_net import PixelCNN
from pixelcnn.sampling import complete_fast, draw_uniforms, sample_fast
from test_data import write_dataset
from test_evaluate import SIZE, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NETS = {
    "pixelcnn-conditional": lambda: PixelCNN(levels=4, filters=8, residual_blocks=1, num_classes=10),
    "gated": lambda: GatedPixelCNN(levels=4, channels=8, layers=2),
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, n_train=5010, n_test=20)
    setup_datamodule(root, SIZE, 4)  # writes the cache the tests read test images from, whichever test runs first
    return root


@pytest.mark.parametrize("name", NETS)
def test_complete_fast_keeps_rows_and_matches_the_sampler(name):
    torch.manual_seed(0)
    net = NETS[name]().eval()
    labels = torch.arange(6) % 10 if net.num_classes else None
    known = torch.randint(4, (6, 5, 7))
    uniforms = draw_uniforms(6, 5, 7, seed=1, device=torch.device("cpu"))
    completed = complete_fast(net, known, 2, uniforms, 1.0, labels)
    assert completed.shape == (6, 5, 7) and completed.dtype == torch.long
    assert torch.equal(completed[:, :2], known[:, :2]) and not torch.equal(completed, known)
    assert torch.equal(complete_fast(net, known, 5, uniforms, 1.0, labels), known)  # all rows kept
    # Nothing kept is plain sampling, with the same random numbers.
    sampled = sample_fast(net, uniforms, 5, 7, 1.0, labels)
    assert torch.equal(complete_fast(net, known, 0, uniforms, 1.0, labels), sampled)


def complete_config(ckpt: Path, data_root: Path, out: Path, **overrides) -> OmegaConf:
    cfg = OmegaConf.load(ROOT / "conf/entry/sample.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    return OmegaConf.merge(cfg, {"ckpt": str(ckpt), "data_root": str(data_root), "out": str(out), "mode": "complete",
                                 "n": 5, "completions": 3, "rows": 3, "scale": 2, **overrides})


@pytest.mark.parametrize("num_classes", [0, 10])
def test_complete_writes_figure_and_levels(tmp_path, data_root, num_classes):
    module = load_module(save_checkpoint(tmp_path / "tiny.ckpt", num_classes))
    png, npy = complete(module, complete_config(tmp_path / "tiny.ckpt", data_root, tmp_path), tmp_path)
    completed = torch.from_numpy(np.load(npy)).long()
    originals = torch.load(data_root / f"fashion_mnist_{SIZE}px_4lv.pt")["test_images"][:5, 0].long()  # (5, H, W)
    assert completed.shape == (5, 3, SIZE, SIZE) and png.stat().st_size > 0
    assert torch.equal(completed[:, :, :3], originals[:, None, :3].expand(5, 3, 3, SIZE))
    assert not torch.equal(completed[:, 0], completed[:, 1])  # completions differ
    if num_classes:  # conditioned on each test image's own label
        labels = torch.load(data_root / f"fashion_mnist_{SIZE}px_4lv.pt")["test_labels"][:5].repeat_interleave(3)
        uniforms = draw_uniforms(15, SIZE, SIZE, 0, torch.device("cpu"))
        expected = complete_fast(module.net, originals.repeat_interleave(3, dim=0), 3, uniforms, 1.0, labels)
        assert torch.equal(completed.flatten(0, 1), expected)

    _, npy = complete(module, complete_config(tmp_path, data_root, tmp_path, rows=SIZE), tmp_path)
    assert torch.equal(torch.from_numpy(np.load(npy)).long(), originals[:, None].expand(5, 3, SIZE, SIZE))


def test_label_picks_test_images_of_that_class(tmp_path, data_root):
    module = load_module(save_checkpoint(tmp_path / "tiny.ckpt"))
    cached = torch.load(data_root / f"fashion_mnist_{SIZE}px_4lv.pt")
    label = int(cached["test_labels"][3])
    _, npy = complete(module, complete_config(tmp_path, data_root, tmp_path, label=label, rows=SIZE), tmp_path)
    expected = cached["test_images"][cached["test_labels"] == label][:5, 0]
    assert torch.equal(torch.from_numpy(np.load(npy))[:, 0], expected)


@pytest.mark.parametrize(("override", "message"),
                         [({"rows": SIZE + 1}, "rows="), ({"rows": -1}, "rows="), ({"completions": 0}, "completions="),
                          ({"temperature": [0.5, 1.0]}, "one temperature"), ({"method": "naive"}, "fast"),
                          ({"label": "all"}, "label=all")])
def test_bad_options_are_user_errors(tmp_path, override, message):
    """Through `sample.py`'s run: config.validate checks ranges (rows >= 0, completions >= 1), the
    completion what depends on the model (rows <= its image height), all before any data is read."""
    save_checkpoint(tmp_path / "tiny.ckpt")
    with pytest.raises(UserError, match=message):
        sample_run(complete_config(tmp_path / "tiny.ckpt", tmp_path / "no-data", tmp_path / "out", device="cpu",
                                   **override))


def test_rows_above_the_image_height_name_the_allowed_range(tmp_path):
    module = load_module(save_checkpoint(tmp_path / "tiny.ckpt"))
    with pytest.raises(UserError, match=rf"rows={SIZE + 1} is invalid: it must be an integer in \[0, {SIZE}\]"):
        complete(module, complete_config(tmp_path, tmp_path / "no-data", tmp_path, rows=SIZE + 1), tmp_path)


def test_sample_entry_point_complete_mode(tmp_path, data_root):
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt", num_classes=10)
    done = run_here("sample.py", f"ckpt={ckpt}", "mode=complete", "n=40", "completions=2", "rows=4",
                    f"data_root={data_root}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "completions below row 4" in done.stdout
    assert np.load(next((tmp_path / "out").glob("completions_*.npy"))).shape == (16, 2, SIZE, SIZE)  # n capped at 16
