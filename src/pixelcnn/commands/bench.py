"""What `bench.py` measures: training throughput through the real Lightning loop next to a plain
PyTorch fp32 loop of the same model (the reference a user can compare with), epoch time, and naive
vs fast sampling, on whatever device is present. Medians over repetitions."""

from __future__ import annotations

import math
import platform
import resource
import statistics
import timeit
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from pixelcnn.ops.rules import check_out_dir, validate

from pixelcnn.ops.callbacks import RunTimeEstimate, synced_time
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.files import write_json
from pixelcnn.ops.run_dirs import register_resolvers
from pixelcnn.sampling import draw_uniforms, sample_fast, sample_naive
from pixelcnn.ops.resources import SpeedChoices
from pixelcnn.training import build_module, build_network, prepare_run

register_resolvers()  # conf/bench.yaml composes the training config, which uses them


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # The process's peak RSS: in KiB on Linux, in bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if platform.system() == "Darwin" else 1024)


def reset_peak(device: torch.device) -> None:
    # No sync first: the caching allocator counts memory on the host as tensors are allocated and freed, not as
    # the GPU runs the queued work.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def fit_once(cfg: DictConfig, datamodule: L.LightningDataModule, speed: SpeedChoices, batches: int | None = None,
             timed_epoch: int = 0) -> RunTimeEstimate:
    """One `Trainer.fit` with the run's real module, data and speed settings, minus I/O, up to `timed_epoch`,
    timed by train.py's run-time estimate: the bench.train_batches after bench.warmup_batches, and that epoch."""
    module = build_module(cfg, speed, datamodule)
    timer = RunTimeEstimate(timed_epoch, warmup=cfg.bench.warmup_batches, measure=cfg.bench.train_batches, report=False)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=speed.precision,
                        max_epochs=timed_epoch + 1, limit_train_batches=batches,
                        limit_val_batches=None if batches is None else 0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], log_every_n_steps=cfg.trainer.log_every_n_steps)
    trainer.fit(module, datamodule=datamodule)
    return timer


def plain_loop_rate(cfg: DictConfig, datamodule: L.LightningDataModule, device: torch.device, steps: int,
                    warmup: int) -> float:
    """img/s of a plain PyTorch loop over the same model and batches, in fp32 and not compiled: no
    Lightning, no autocast. `warmup` steps, then `steps` timed ones."""
    plain = SpeedChoices(cuda=device.type == "cuda", compile=False, precision="32-true", channels_last=False)
    module = build_module(cfg, plain, datamodule).to(device)  # its loss is plain PyTorch: scale, network, cross-entropy
    # The optimizer the module uses (AdamW, fused on CUDA, foreach elsewhere); the lr does not change the speed.
    optimizer = torch.optim.AdamW(module.parameters(), **({"fused": True} if plain.cuda else {"foreach": True}))
    images, labels = (t.to(device) for t in datamodule.train_set)
    batch_size = cfg.data.batch_size
    batches = torch.randperm(len(images), device=device).split(batch_size)[: max(len(images) // batch_size, 1)]  # full
    for step in range(warmup + steps):
        if step == warmup:
            start = synced_time(device)
        index = batches[step % len(batches)]
        loss = module.mean_bits_per_dim(images[index], labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (synced_time(device) - start)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """The median time of `repeats` calls of `fn`, each timed alone (a GPU's queued work included; timeit pauses
    the garbage collector meanwhile)."""
    return statistics.median(timeit.repeat(fn, timer=lambda: synced_time(device), repeat=repeats, number=1))


def bench_table(result: dict) -> str:
    train, speed, run_min = result["train"], result["speed"], result["train"]["est_run_min"]
    lines = [
        f"device: {result['device']}  (torch {result['torch']}, model {result['model']}, batch {result['batch_size']}, "
        f"speed {result['speed']})",
        "| measure | value |", "|---|---|",
        f"| train img/s, plain PyTorch fp32 loop (reference, median) | {train['plain_fp32_img_per_s']:,.0f} |",
        f"| train img/s (Lightning loop, median) | {train['img_per_s']:,.0f} |",
        f"| ratio: Lightning loop ({speed['precision']}{', compiled' if speed['compile'] else ''}) / plain fp32 loop "
        f"| {train['vs_plain_fp32']:.2f}x |",
        f"| epoch s {'incl. validation' if train['epoch_s_measured'] else '(estimate: train images / img/s)'} "
        f"| {train['epoch_s']:.2f} |",
        f"| full run at max_epochs (min) | {'no epoch limit' if run_min is None else f'{run_min:.1f}'} |",
        f"| train peak memory (MiB) | {train['peak_memory_mb']:,.0f} |",
    ]
    for n, entry in result["sampling"].items():
        naive = f"{entry['naive_s']:.3f} s" if "naive_s" in entry else "skipped"
        lines.append(f"| sample {n}: naive / fast | {naive} / {entry['fast_s']:.3f} s |")
        if "speedup" in entry:
            lines.append(f"| ratio: fast / naive sampling, n={n} | {entry['speedup']:.0f}x |")
    return "\n".join(lines)


def main(cfg: DictConfig) -> dict:
    """Measure, print the table and write it with the config as JSON (bench.out); returns the measures."""
    validate(cfg, "bench")
    if Path(cfg.bench.out).exists():  # a folder, or an earlier result: fail now, not after minutes of measuring
        raise UserError(f"bench.out={cfg.bench.out} exists: pass a new file name (a benchmark replaces no file)")
    check_out_dir(Path(cfg.bench.out).parent, key="bench.out")
    # The speed choices are made up front (Lightning moves the module back to the CPU when `fit` ends), as
    # train.py makes them for the whole configured run, however few batches are timed here.
    datamodule, speed = prepare_run(cfg)
    bench = cfg.bench
    if bench.warmup_batches >= (batches := math.ceil(len(datamodule.train_set[0]) / cfg.data.batch_size)):
        raise UserError(f"bench.warmup_batches={bench.warmup_batches} leaves none of an epoch's {batches} batches to "
                        "time: lower it")
    device = torch.device("cuda" if speed.cuda else "cpu")
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result: dict = {"device": torch.cuda.get_device_name(device) if speed.cuda else cpu,
                    "torch": torch.__version__, "model": cfg.model.arch, "batch_size": cfg.data.batch_size,
                    "speed": vars(speed), "sampling": {}}

    # 1. training throughput: several short fits, median img/s after the warm-up batches; the peak
    # memory of them all (reset once: the max of each fit's peak).
    reset_peak(device)
    timers = [fit_once(cfg, datamodule, speed, bench.warmup_batches + bench.train_batches)
              for _ in range(bench.repeats)]
    rates = [timer.images / timer.seconds for timer in timers]
    result["train"] = {"img_per_s": statistics.median(rates), "img_per_s_runs": rates,
                       "peak_memory_mb": peak_memory_mb(device)}
    plain = [plain_loop_rate(cfg, datamodule, device, bench.train_batches, bench.warmup_batches)
             for _ in range(bench.repeats)]
    result["train"] |= {"plain_fp32_img_per_s": statistics.median(plain), "plain_fp32_img_per_s_runs": plain,
                        "vs_plain_fp32": statistics.median(rates) / statistics.median(plain)}

    # 2. a whole epoch with validation, measured on the second epoch (the first compiles), or estimated:
    # training images / throughput.
    measured = bench.epoch == "measure" or (bench.epoch == "auto" and device.type == "cuda")
    epoch_s = (fit_once(cfg, datamodule, speed, timed_epoch=1).epoch_seconds if measured
               else len(datamodule.train_set[0]) / result["train"]["img_per_s"])
    result["train"] |= {"epoch_s": epoch_s, "epoch_s_measured": measured,  # max_epochs -1: no run length to estimate
                        "est_run_min": epoch_s * cfg.trainer.max_epochs / 60 if cfg.trainer.max_epochs > 0 else None}

    # 3. sampling: the model's own size, fresh weights (speed does not depend on them).
    net = build_network(cfg).to(device).eval()
    size = cfg.data.image_size
    for n in bench.sample_sizes:
        uniforms = draw_uniforms(n, size, size, seed=0, device=device, channels=net.image_channels)
        labels = torch.arange(n, device=device) % cfg.model.num_classes if cfg.model.num_classes else None

        def draw(sampler=sample_fast):
            return sampler(net, uniforms, size, size, 1.0, labels)

        reset_peak(device)
        draw()  # warm-up (and CUDA graph capture)
        entry = {"fast_s": median_seconds(draw, device, bench.repeats), "fast_peak_memory_mb": peak_memory_mb(device)}
        if n <= bench.naive_max_n or device.type == "cuda":
            entry["naive_s"] = median_seconds(lambda: draw(sample_naive), device, bench.naive_repeats)
            entry["speedup"] = entry["naive_s"] / entry["fast_s"]
        result["sampling"][str(n)] = entry
    print(bench_table(result))
    write_json(cfg.bench.out, {**result, "config": OmegaConf.to_container(cfg, resolve=True)})
    print(f"written: {cfg.bench.out}")
    return result
