"""What `speed=auto` and `trainer.precision=auto` choose on a CPU (with its bf16 support faked, so
both paths run on any machine), and that sampling loads without the training stack (structural:
which modules a command imports, not how long it takes; bench.py measures the time)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelcnn.ops.checkpoints import load_module
from pixelcnn.module import ImageModule
from pixelcnn.ops.resources import CPU_COMPILE_MIN_STEPS, SpeedChoices, cpu_has_native_bf16, planned_steps, resolve_speed
from test_cli import ROOT, compose_train

BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's CPUID checks


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Fakes the CPU's answer: `cpu_bf16(avx512_bf16, amx)`."""
    def fake(avx512_bf16: bool, amx: bool) -> None:
        for probe, answer in zip(BF16_PROBES, (avx512_bf16, amx)):
            monkeypatch.setattr(torch.cpu, probe, lambda answer=answer: answer, raising=False)
    return fake


def test_cpu_without_native_bf16_keeps_fp32(cpu_bf16):
    cpu_bf16(False, False)
    cfg = compose_train("trainer.accelerator=cpu")
    assert not cpu_has_native_bf16()
    assert resolve_speed(cfg, math.inf) == SpeedChoices(cuda=False, compile=False, precision="32-true",
                                                        channels_last=False)


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True)])
def test_cpu_with_native_bf16_trains_in_bf16_and_compiles_long_runs(cpu_bf16, avx512_bf16: bool, amx: bool):
    cpu_bf16(avx512_bf16, amx)
    cfg = compose_train("trainer.accelerator=cpu")
    short, long = resolve_speed(cfg, CPU_COMPILE_MIN_STEPS - 1), resolve_speed(cfg, CPU_COMPILE_MIN_STEPS)
    assert short == SpeedChoices(cuda=False, compile=False, precision="bf16-mixed", channels_last=False)
    assert long == SpeedChoices(cuda=False, compile=True, precision="bf16-mixed", channels_last=False)
    # What the user sets wins: Lightning's precision as given (then nothing compiles on a CPU), compile off.
    fp32 = resolve_speed(compose_train("trainer.accelerator=cpu", "trainer.precision=32-true"), math.inf)
    assert (fp32.precision, fp32.compile) == ("32-true", False)
    off = resolve_speed(compose_train("trainer.accelerator=cpu", "speed.compile=false"), math.inf)
    assert (off.precision, off.compile) == ("bf16-mixed", False)


def test_planned_steps_follow_the_trainer_limits():
    train_images = 55_000  # 430 batches of 128
    assert planned_steps(compose_train(), train_images) == 430 * 150  # the seed run: compiled where bf16 is native
    assert planned_steps(compose_train("experiment=quick"), train_images) == 430 * 10
    assert planned_steps(compose_train("trainer.max_steps=500"), train_images) == 500
    assert planned_steps(compose_train("trainer.limit_train_batches=0.5", "trainer.max_epochs=2"), train_images) == 430
    assert planned_steps(compose_train("+trainer.overfit_batches=3"), train_images) == 3 * 150
    assert planned_steps(compose_train("+trainer.fast_dev_run=true"), train_images) == 1
    assert planned_steps(compose_train("trainer.max_epochs=-1"), train_images) == math.inf


def save_tiny_checkpoint(path: Path, num_classes: int = 0) -> ImageModule:
    torch.manual_seed(0)
    module = ImageModule(levels=4, image_size=8, num_classes=num_classes, filters=8, residual_blocks=1)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return module


def test_loaded_model_samples_the_training_modules_images(tmp_path: Path):
    module = save_tiny_checkpoint(tmp_path / "tiny.ckpt", num_classes=10)
    loaded = load_module(tmp_path / "tiny.ckpt")
    labels = torch.arange(12) % 10
    assert not isinstance(loaded, ImageModule) and not loaded.training
    assert torch.equal(loaded.sample(12, 1.0, 3, labels), module.sample(12, 1.0, 3, labels))
    images = torch.randint(0, 4, (5, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(loaded.image_bits_per_dim(images), module.image_bits_per_dim(images))


HEAVY = ("lightning", "pytorch_lightning", "torchmetrics", "torchvision", "matplotlib", "tensorboard")


def test_sample_and_evaluate_do_not_import_the_training_stack(tmp_path: Path):
    """sample.py and evaluate.py images=<.npy> run whole in one process; then none of HEAVY is loaded,
    and the objects of their imports are frozen out of garbage collection, which runs again after them."""
    save_tiny_checkpoint(tmp_path / "tiny.ckpt")
    np.save(tmp_path / "images.npy", np.zeros((2, 8, 8), dtype=np.uint8))
    commands = [("sample.py", "n=4"), ("evaluate.py", f"images={tmp_path / 'images.npy'}")]
    for script, argument in commands:
        code = (f"import runpy, sys; sys.argv = [{script!r}, 'ckpt={tmp_path / 'tiny.ckpt'}', {argument!r}, "
                f"'out={tmp_path / script}']; runpy.run_path({str(ROOT / script)!r}, run_name='__main__'); "
                f"import gc; print(gc.isenabled(), gc.get_freeze_count()); "
                f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines()[-1] == "[]", f"{script} imported {result.stdout.splitlines()[-1]}"
        enabled, frozen = result.stdout.splitlines()[-2].split()
        assert enabled == "True" and int(frozen) > 100_000, f"{script}: gc enabled {enabled}, {frozen} objects frozen"
        assert any((tmp_path / script).iterdir())  # it did its work
