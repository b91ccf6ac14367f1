"""Likelihood tools: exact test bits/dim, figures, outlier scoring of .npy and PNG inputs, errors,
and `evaluate.py` end to end. Tiny untrained models on tiny synthetic IDX files."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.io import write_png

from commands import run_here
from pixelcnn.ops.checkpoints import load_module
from pixelcnn.ops.errors import UserError
from pixelcnn.data import quantize
from pixelcnn.commands.evaluate import load_images
from pixelcnn.commands.evaluate import main as run
from pixelcnn.ops.images import levels_to_grid, save_grid
from pixelcnn.module import ImageModule
from test_data import write_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 8  # the tiny models' image size; the IDX files are 28x28 and get resized like real data
N_TEST = 20


def save_checkpoint(path: Path, num_classes: int = 0, arch: str = "pixelcnn") -> Path:
    """A Lightning-free checkpoint of a tiny random model, in the format `load_module` reads."""
    torch.manual_seed(0)
    sizes = {"pixelcnn": {"filters": 8, "residual_blocks": 1}, "gated": {"channels": 8, "layers": 2}}[arch]
    module = ImageModule(arch=arch, levels=4, image_size=SIZE, num_classes=num_classes, **sizes)
    for p in module.parameters():  # random class biases too (they start at zero), so conditioning matters
        torch.nn.init.normal_(p, std=0.3)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """IDX files with enough training images for the data module's default 5000-image val split."""
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, n_train=5010, n_test=N_TEST)
    return root


def eval_config(ckpt: Path, data_root: Path, out: Path, **overrides) -> OmegaConf:
    cfg = OmegaConf.load(ROOT / "conf/entry/evaluate.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    return OmegaConf.merge(cfg, {"ckpt": str(ckpt), "data_root": str(data_root), "out": str(out), "quality": False,
                                 "batch_size": 7, **overrides})


def eval_cfg_scale() -> int:
    return OmegaConf.load(ROOT / "conf/entry/evaluate.yaml").scale


@pytest.mark.parametrize("num_classes", [0, 10])
def test_test_bpd_equals_module_loss_and_figures_exist(tmp_path, data_root, num_classes):
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt", num_classes)
    metrics = run(eval_config(ckpt, data_root, tmp_path / "eval", extremes=4))
    module = load_module(ckpt)
    cached = torch.load(data_root / f"fashion_mnist_{SIZE}px_4lv.pt")  # written by the data module
    with torch.no_grad():  # the whole test split as one batch of the training loss
        expected = module.mean_bits_per_dim(cached["test_images"], cached["test_labels"]).item()
    assert metrics["test_bpd"] == pytest.approx(expected, abs=1e-5) and metrics["test_images"] == N_TEST
    assert metrics["bpd_most_likely"] <= metrics["test_bpd"] <= metrics["bpd_least_likely"]
    for name in ("nll_heatmaps.png", "most_likely.png", "least_likely.png", "metrics.json"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test_bpd"] == metrics["test_bpd"]

    # The extremes figures show the 4 test images with the lowest / highest bits/dim, in order.
    with torch.no_grad():
        per_image = module.nll_bits_per_pixel(cached["test_images"], cached["test_labels"]).mean((1, 2))
    order = per_image.argsort()
    for name, index in (("most_likely", order[:4]), ("least_likely", order.flip(0)[:4])):
        expected_png = save_grid(levels_to_grid(cached["test_images"][index], 4, scale=eval_cfg_scale()),
                                 tmp_path / f"expected_{name}.png")
        assert np.array_equal(np.asarray(Image.open(tmp_path / "eval" / f"{name}.png")), np.asarray(Image.open(expected_png)))


def test_quality_metrics_capped_and_classifier_cached_in_data_root(tmp_path, data_root):
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt", num_classes=10)
    metrics = run(eval_config(ckpt, data_root, tmp_path / "eval", quality=True, quality_n=1000, extremes=2,
                              heatmaps=0))
    # The default 5000-image val split leaves 10 training images: n is capped there (floor: n train vs n test).
    assert metrics["quality_n"] == 10 and (data_root / f"classifier_{SIZE}px_4lv.pt").is_file()
    assert metrics["frechet_distance"] > 0 and metrics["frechet_distance_floor"] > 0
    assert 0 <= metrics["class_accuracy"] <= 1 and 0 <= metrics["classifier_test_accuracy"] <= 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["quality_n"] == 10

    skipped = run(eval_config(ckpt, data_root, tmp_path / "eval0", quality=True, quality_n=0, extremes=2, heatmaps=0))
    assert "frechet_distance" not in skipped and "quality_n" not in skipped  # quality_n=0 is quality=false


@pytest.mark.parametrize(("override", "message"),
                         [({"quality_n": 1}, "quality_n="), ({"batch_size": 0}, "batch_size="),
                          ({"heatmaps": -1}, "heatmaps="), ({"extremes": 0}, "extremes="),
                          ({"quality": "yes"}, "quality="), ({"temperature": [0.5, 1.0]}, "one temperature")])
def test_bad_options_are_user_errors(tmp_path, override, message):
    with pytest.raises(UserError, match=message):  # before the checkpoint or any data is read
        run(eval_config(tmp_path / "missing.ckpt", tmp_path / "no-data", tmp_path / "eval", **override))


def test_conditional_score_without_labels_is_the_class_marginal(tmp_path):
    module = load_module(save_checkpoint(tmp_path / "c.ckpt", num_classes=10))
    images = torch.randint(4, (5, 1, SIZE, SIZE), dtype=torch.uint8)
    per_class = torch.stack([module.image_bits_per_dim(images, torch.full((5,), c)) for c in range(10)], 1)  # (5, 10)
    marginal = module.image_bits_per_dim(images)
    # mean_c 2^-b_c lies between max_c 2^-b_c / 10 and max_c 2^-b_c.
    best = per_class.min(1).values
    assert (marginal >= best - 1e-9).all() and (marginal <= best + np.log2(10) / SIZE**2 + 1e-9).all()
    assert (marginal < per_class.mean(1)).all()


def test_scores_npy_in_both_layouts(tmp_path):
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt")
    images = np.random.default_rng(0).integers(0, 4, (3, SIZE, SIZE)).astype(np.int64)
    np.save(tmp_path / "flat.npy", images)
    np.save(tmp_path / "channel.npy", images[:, None].astype(np.uint8))
    expected = load_module(ckpt).image_bits_per_dim(torch.from_numpy(images).to(torch.uint8)[:, None])
    for name in ("flat", "channel"):
        result = run(eval_config(ckpt, tmp_path, tmp_path / name, images=str(tmp_path / f"{name}.npy")))
        assert result["images"] == [f"{name}.npy[{i}]" for i in range(3)]
        assert result["bits_per_dim"] == pytest.approx(expected.tolist())
        rows = list(csv.reader((tmp_path / name / f"scores_{name}.csv").open()))  # a new folder per call
        assert rows[0] == ["image", "bits_per_dim"] and float(rows[3][1]) == pytest.approx(expected[2].item())


def test_scores_png_folder_with_training_preprocessing(tmp_path):
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt")
    pictures = torch.randint(256, (2, 1, 28, 28), dtype=torch.uint8)
    (tmp_path / "pngs").mkdir()
    for i, picture in enumerate(pictures):
        write_png(picture, str(tmp_path / "pngs" / f"img{i}.png"))
    (tmp_path / "pngs" / "notes.txt").write_text("ignored")
    images, names = load_images(tmp_path / "pngs", SIZE, 4)
    assert names == ["img0.png", "img1.png"] and torch.equal(images, quantize(pictures[:, 0], SIZE, 4))
    result = run(eval_config(ckpt, tmp_path, tmp_path / "out", images=str(tmp_path / "pngs")))
    assert result["bits_per_dim"] == pytest.approx(load_module(ckpt).image_bits_per_dim(images).tolist())
    assert Path(result["csv"]).name == "scores_pngs.csv"


def test_exported_test_split_scores_its_test_bpd(tmp_path, data_root):
    """The checkpoint's test split written as PNGs in class folders (images.py's writer, at the data's levels),
    scored with images=<folder>, gives back each test image, and the test bits/dim evaluate.py reports for it."""
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt")
    metrics = run(eval_config(ckpt, data_root, tmp_path / "eval", heatmaps=0, extremes=1))
    cached = torch.load(data_root / f"fashion_mnist_{SIZE}px_4lv.pt")  # the test split evaluate.py scored
    test_images, test_labels = cached["test_images"], cached["test_labels"]
    for k, (image, label) in enumerate(zip(test_images, test_labels)):
        (tmp_path / "export" / str(label.item())).mkdir(parents=True, exist_ok=True)
        save_grid(levels_to_grid(image[None], 4), tmp_path / "export" / str(label.item()) / f"{k:03d}.png")
    scored = run(eval_config(ckpt, data_root, tmp_path / "scores", images=str(tmp_path / "export")))
    images, names = load_images(tmp_path / "export", SIZE, 4)
    assert names == scored["images"] and len(names) == N_TEST
    assert torch.equal(images, test_images[[int(Path(name).stem) for name in names]])
    assert np.mean(scored["bits_per_dim"]) == pytest.approx(metrics["test_bpd"], abs=1e-9)  # the same, to rounding


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """A .npz file's content (np.load reads one whatever its name says)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.zeros((2, 5, 5), np.uint8), "has shape"),
        (np.zeros((2, 2, SIZE, SIZE), np.uint8), "has shape"),
        (np.zeros((0, SIZE, SIZE), np.uint8), "has shape"),
        (np.full((2, SIZE, SIZE), 4), "values 4..4"),
        (np.full((2, SIZE, SIZE), -1), "values -1..-1"),
        (np.zeros((2, SIZE, SIZE), np.float32), "float32"),
        (b"not numpy", "not a readable .npy"),
        (npz_bytes(levels=np.zeros((2, SIZE, SIZE), np.uint8)), r"is a .npz archive \(levels\): pass a .npy"),
    ],
)
def test_bad_npy_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "bad.npy"
    np.save(path, content) if isinstance(content, np.ndarray) else path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_images(path, SIZE, 4)


def test_bad_paths_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "table.csv").write_text("a,b")
    for path, message in [(tmp_path / "missing.npy", "does not exist"), (tmp_path / "empty", "not a .npy file"),
                          (tmp_path / "broken.png", "not a readable PNG"), (tmp_path / "table.csv", "not a .npy file")]:
        with pytest.raises(UserError, match=message):
            load_images(path, SIZE, 4)


def test_evaluate_entry_point(tmp_path, data_root):
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt", arch="gated")
    done = run_here("evaluate.py", f"ckpt={ckpt}", f"data_root={data_root}", "quality=false", "heatmaps=3",
                    f"out={tmp_path / 'eval'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test bits/dim" in done.stdout and (tmp_path / "eval" / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "tiny.ckpt"]  # nothing else written


def test_commands_share_one_data_dir_whatever_the_launch_dir(tmp_path):
    """evaluate.py run from two folders builds the data cache and trains the classifier once,
    in $PIXELCNN_DATA_DIR, and writes nothing into either launch folder."""
    data_dir, ckpt = tmp_path / "cache", save_checkpoint(tmp_path / "tiny.ckpt", num_classes=10)
    write_dataset(data_dir, n_train=5010, n_test=N_TEST)
    env = {**os.environ, "PIXELCNN_DATA_DIR": str(data_dir)}
    outputs = []
    for name in ("first", "second"):
        launch = tmp_path / name
        launch.mkdir()
        done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"ckpt={ckpt}", "quality_n=10", "heatmaps=0",
                               "extremes=2", f"out={tmp_path / name / 'eval'}", "device=cpu"],
                              cwd=launch, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in launch.iterdir()) == ["eval"]  # no data/ where it was launched
        outputs.append(done.stdout)
    assert "no cached classifier" in outputs[0] and "no cached classifier" not in outputs[1]
    assert (data_dir / f"fashion_mnist_{SIZE}px_4lv.pt").is_file() and (data_dir / f"classifier_{SIZE}px_4lv.pt").is_file()


def test_a_diverged_model_scores_nan_as_null_in_valid_json(tmp_path, data_root):
    """A checkpoint whose weights hold NaN (a run that diverged) scores NaN bits/dim: metrics.json holds null
    there (json.dumps would write NaN, which no strict JSON reader takes), and the figures are still drawn."""
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt")
    checkpoint = torch.load(ckpt)
    next(iter(checkpoint["state_dict"].values())).fill_(float("nan"))
    torch.save(checkpoint, ckpt)
    metrics = run(eval_config(ckpt, data_root, tmp_path / "eval", extremes=2))
    assert np.isnan(metrics["test_bpd"])
    def strict(constant):
        raise ValueError(f"not JSON: {constant}")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text(), parse_constant=strict)
    assert saved["test_bpd"] is None and saved["test_images"] == N_TEST
    assert (tmp_path / "eval" / "nll_heatmaps.png").stat().st_size > 0


def test_no_call_replaces_a_file_another_wrote(data_root: Path, tmp_path: Path):
    """evaluate.py and sample.py never replace a file that another call (or the training run) wrote: without out=,
    each call writes into a new folder of the run dir (here: beside the checkpoint), eval, eval_1, ...; an out= that
    holds files is refused in one line before any work (not the run's own metrics.json replaced); a call that fails
    leaves no folder behind."""
    ckpt = save_checkpoint(tmp_path / "model.ckpt")
    record = tmp_path / "metrics.json"  # the training run's own record
    record.write_text('{"val_bpd": 1.0}')
    args = [f"ckpt={ckpt}", f"data_root={data_root}", "quality=false", "heatmaps=1", "extremes=1", "device=cpu"]
    assert [run_here("evaluate.py", *args, cwd=tmp_path).returncode for _ in range(2)] == [0, 0]
    first, second = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("eval", "eval_1"))
    assert first["test_bpd"] == second["test_bpd"] and first["files"] != second["files"]
    refused = run_here("evaluate.py", *args, f"out={tmp_path}", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: out={tmp_path} already holds files"), \
        refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and record.read_text() == '{"val_bpd": 1.0}'
    drawn = [run_here("sample.py", f"ckpt={ckpt}", "n=2", "device=cpu", cwd=tmp_path) for _ in range(2)]
    assert [result.returncode for result in drawn] == [0, 0], drawn[-1].stderr
    assert [len(list((tmp_path / name).glob("*.png"))) for name in ("samples", "samples_1")] == [1, 1]
    mine = tmp_path / "mine"  # an empty folder of the user's: a failing call, in a sweep (-m) too, leaves it be
    mine.mkdir()
    failed = run_here("evaluate.py", "-m", *args, f"out={mine}", f"images={tmp_path / 'missing'}", cwd=tmp_path)
    assert failed.returncode != 0 and mine.is_dir(), failed.stderr
    failed = run_here("sample.py", f"ckpt={ckpt}", "label=3", "device=cpu", cwd=tmp_path)  # no classes: no label
    assert failed.returncode == 2 and not (tmp_path / "samples_2").exists(), failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "multirun") == [
        "eval", "eval_1", "metrics.json", "mine", "model.ckpt", "samples", "samples_1"]
