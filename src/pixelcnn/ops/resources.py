"""The CPU threads and the GPU of one training job, so that jobs running side by side share the
machine instead of fighting over it.

- A parallel sweep (`hydra/launcher=parallel`, hydra-joblib-launcher) runs `n_jobs` jobs at once:
  each gets `cores // n_jobs` torch threads, and job k runs on GPU k mod G (with one GPU they share it).
- A SLURM job uses the CPUs SLURM gave its task (`SLURM_CPUS_PER_TASK`); SLURM also picks its GPUs
  (CUDA_VISIBLE_DEVICES), so the GPU is left alone there.
- Anything else (a plain run, a serial sweep) keeps torch's own defaults.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import suppress
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from pixelcnn.ops.errors import UserError

log = logging.getLogger(__name__)

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


@dataclass(frozen=True)
class JobResources:
    cpus: int                 # the cores the jobs running at once share (SLURM's allocation when in a SLURM job)
    threads: int | None       # torch threads for this job; None: torch's default is kept
    cuda_device: int | None   # the CUDA device index for this job; None: Lightning's choice


def plan_resources(job_num: int, concurrent: int, cpus: int, gpus: int, thread_limit: int,
                   slurm_cpus: int | None = None) -> JobResources:
    """What one job may use. `cpus`: the cores this process may run on; `gpus`: CUDA devices
    visible; `thread_limit`: the threads the process would use by itself (OMP_NUM_THREADS or
    torch's default), never exceeded, so a user's OMP_NUM_THREADS=1 still holds; `slurm_cpus`:
    SLURM_CPUS_PER_TASK, the cores SLURM gave this task."""
    cpus = slurm_cpus or cpus
    # A share of the cores, so that the jobs at once never oversubscribe them; else torch's default (None).
    threads = max(1, min(cpus // concurrent, thread_limit)) if concurrent > 1 or slurm_cpus else None
    cuda_device = job_num % gpus if concurrent > 1 and gpus > 0 else None
    return JobResources(cpus, threads, cuda_device)


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask: taskset, cpusets, SLURM binding; not on macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def concurrent_jobs() -> tuple[int, int]:
    """(this job's number, how many jobs run at once on this machine) from the Hydra config of the
    job in progress: `hydra.launcher.n_jobs` for the joblib launcher (-1: one per core, as in joblib)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or (hydra_cfg := HydraConfig.get()).mode != RunMode.MULTIRUN:
        return 0, 1
    job_num = int(hydra_cfg.job.get("num", 0) or 0)
    if hydra_cfg.launcher.get("_target_") != JOBLIB_LAUNCHER:
        return job_num, 1
    from joblib import effective_n_jobs  # the launcher's own reading of n_jobs (-1, -2, ...)

    return job_num, max(1, effective_n_jobs(hydra_cfg.launcher.get("n_jobs")))


def claim_job_resources(accelerator: str = "auto", devices=1) -> JobResources:
    """Plan this job's share (see `plan_resources`) and apply it: torch's thread count, and for a
    parallel sweep's job on CUDA its GPU as the current device. Call it at the start of a job,
    before torch does any parallel or CUDA work. `accelerator`, `devices`: the trainer's; a
    multi-device setting is the user's and is kept (then `cuda_device` is None)."""
    job_num, concurrent = concurrent_jobs()
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    # Devices counted only for a parallel sweep; a CPU or multi-device trainer's job is left off its GPU.
    gpus = torch.cuda.device_count() if concurrent > 1 and accelerator != "cpu" and devices in (1, "1", "auto") else 0
    resources = plan_resources(job_num, concurrent, available_cpus(), gpus, torch.get_num_threads(),
                               int(slurm_cpus) if slurm_cpus.isdigit() else None)
    if resources.threads is not None:
        torch.set_num_threads(resources.threads)
        with suppress(RuntimeError):  # set once per process: a reused joblib worker already has it
            torch.set_num_interop_threads(resources.threads)
        log.info("job %d: %d CPU threads (%d jobs at once on %d cores%s)", job_num, torch.get_num_threads(),
                 concurrent, resources.cpus, f", SLURM_CPUS_PER_TASK={slurm_cpus}" if slurm_cpus else "")
    if concurrent > resources.cpus:
        log.warning("%d jobs at once on %d cores time-share them (one thread each): hydra.launcher.n_jobs=%d or "
                    "fewer avoids that", concurrent, resources.cpus, resources.cpus)
    if resources.cuda_device is not None:
        # Before anything touches CUDA, so that this job's context (and plain `.to("cuda")`) is on its GPU.
        torch.cuda.set_device(resources.cuda_device)
        log.info("job %d: CUDA device %d of %d", job_num, resources.cuda_device, gpus)
    return resources


def cuda_device_args(resources: JobResources) -> dict:
    """lightning.Trainer arguments that put a parallel sweep's job on its own GPU (when it trains on CUDA)."""
    return {} if resources.cuda_device is None else {"devices": [resources.cuda_device]}


def secondary_rank() -> bool:
    """True in a DDP process other than global rank 0, told by the environment that started it
    (so known before Lightning sets up): LOCAL_RANK (the processes Lightning itself starts),
    RANK (torchrun), SLURM_PROCID (srun), NODE_RANK (the other machines)."""
    return any(os.environ.get(key, "0") != "0" for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


def say(message: str) -> None:
    """One `[pixelcnn]` line, printed by rank 0 only (every rank completes the same config, builds the same module)."""
    if not secondary_rank():
        print(f"[pixelcnn] {message}", flush=True)


# ---------------------------------------------------------------------------- does the model fit


@dataclass(frozen=True)
class Footprint:
    """What one training step of a network needs, counted on the meta device (no memory used)."""
    parameters: int
    state_bytes: int          # fp32 weights, their gradients and AdamW's two moments: 16 bytes per parameter
    activation_bytes: int     # every layer's output at the batch size, which autograd keeps for the backward pass
    step_flops: float         # one optimizer step: the backward pass costs about twice the forward


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a job on `device`: CUDA's free memory, or the host's MemAvailable; None where the system
    does not say (macOS has neither /proc/meminfo nor SC_AVPHYS_PAGES): then nothing is refused."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the free physical pages, where the system counts them
        if "SC_AVPHYS_PAGES" in getattr(os, "sysconf_names", {}):
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return None


# A lower bound of a step's time needs a device speed no real run beats: above the fp32 peak of a
# CPU core (AVX-512: 2 FMA units x 16 lanes x 2 FLOP x ~3 GHz), and above the dense 16-bit peak of
# any current GPU (H100/H200: ~1e15).
PEAK_FLOPS_PER_CPU_THREAD = 2e11
PEAK_FLOPS_CUDA = 2e15
# An epoch is when a run validates, keeps its best checkpoint and can be judged: one that cannot
# end within a day even at peak speed is a mistyped size, refused rather than left running.
MAX_EPOCH_SECONDS = 24 * 3600


def check_training_fits(footprint: Footprint, device: torch.device, images_per_epoch: int, batch_size: int,
                        size_keys: str) -> None:
    """Refuse, in one line and before anything is allocated, a model whose training cannot fit
    `device`'s free memory or cannot finish one epoch within MAX_EPOCH_SECONDS at peak speed.
    Both are lower bounds (`check_model_fits`), so a model that fits is never refused."""
    free, needed = available_memory(device), footprint.state_bytes + footprint.activation_bytes
    if free is not None and needed > free:
        raise UserError(f"this model needs at least {needed / 1e9:.1f} GB to train at data.batch_size="
                        f"{batch_size} ({footprint.parameters:,} parameters: {footprint.state_bytes / 1e9:.1f} GB with "
                        f"gradients and optimizer state; activations {footprint.activation_bytes / 1e9:.1f} GB), but "
                        f"{device.type} has {free / 1e9:.1f} GB free: lower data.batch_size or {size_keys}")
    # Any accelerator (CUDA, or Apple's MPS that Lightning picks on a Mac) at a GPU's peak: never above the truth.
    peak = PEAK_FLOPS_PER_CPU_THREAD * torch.get_num_threads() if device.type == "cpu" else PEAK_FLOPS_CUDA
    seconds = footprint.step_flops / batch_size * images_per_epoch / peak
    if seconds > MAX_EPOCH_SECONDS:
        raise UserError(f"one epoch of this model ({images_per_epoch:,} images) takes at least {seconds / 3600:.0f} h "
                        f"on {device.type}, even at a peak {peak:.0e} FLOP/s: lower {size_keys}, or shorten the epoch "
                        "with trainer.limit_train_batches")


def check_model_fits(cfg: DictConfig, speed: SpeedChoices, net: nn.Module, trainer, train_images: int) -> None:
    """Refuse a model too large for the trainer's device, or too slow for an epoch to end
    (`check_training_fits`), from `net` built on the meta device (no memory): its `Footprint` at the largest
    batch one device takes, a lower bound of the real need (temporary buffers, the data and the framework
    itself come on top)."""
    from torch.utils.flop_counter import FlopCounterMode  # late: it imports triton (0.06 s)

    images = train_images // trainer.world_size  # one device's share
    batch_size = max(1, min(cfg.data.batch_size, images))  # the largest batch it takes
    values: list[int] = []  # the size of each leaf layer's output

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(output, Tensor) and not list(module.children()):
            values.append(output.numel())

    # `count` on every module (the hook is removed as the block ends), and torch's own count of the forward pass's
    # FLOPs (matrix products and convolutions).
    with (nn.modules.module.register_module_forward_hook(count), torch.device("meta"), torch.no_grad(),
          FlopCounterMode(display=False) as flops):
        labels = torch.zeros(batch_size, dtype=torch.long) if cfg.model.num_classes > 0 else None
        net(torch.zeros(batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), labels)
    parameters = sum(p.numel() for p in net.parameters())
    activation_bytes = 4 if speed.precision == "32-true" else 2  # 16-bit mixed precision keeps 16-bit activations
    footprint = Footprint(parameters, 16 * parameters, sum(values) * activation_bytes, 3 * flops.get_total_flops())
    batches = min(epoch_batches(cfg, images, batch_size), planned_steps(cfg, images))  # one epoch's, at most the run's
    size_keys = " or ".join(f"model.{key}" for key in ("filters", "residual_blocks", "channels", "layers")
                            if key in cfg.model)
    check_training_fits(footprint, trainer.strategy.root_device, batches * batch_size, batch_size, size_keys)


# ---------------------------------------------------------------------------- speed: the `auto` choices


@dataclass
class SpeedChoices:
    cuda: bool
    compile: bool
    precision: str
    channels_last: bool


# speed.compile=auto on a CPU: compile the loss only for runs of at least this many optimizer steps.
# Measured on the 2-core EPYC (AVX-512 BF16), seed model, batch 128, bf16 autocast: the first compiled
# step takes ~50 s, and a run compiles about 3 graphs (the training batch, the epoch's shorter last
# batch, the evaluation batch), ~150 s; then a step takes ~0.144 s instead of ~0.170 s (890 vs 755
# img/s, issue 18), saving ~0.026 s, so compiling pays off after ~6,000 steps. Twice that, 12,000
# (28 epochs of 128), leaves a margin: the seed run (64,500 steps) compiles, experiment=quick (4,300) not.
CPU_COMPILE_MIN_STEPS = 12_000


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), as torch's CPUID probes
    report it; elsewhere bf16 autocast is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's (private, so looked up)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def pick_device(name: str, key: str = "device") -> torch.device:
    """The device of the setting `key`=`name`: `device=` of sample.py, evaluate.py and train_classifier.py
    (auto, cpu, cuda), or trainer.accelerator (gpu and cuda are CUDA; Lightning's other choices are not):
    CUDA where asked for (refused in one line on a machine without it), or by auto where there is one."""
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but no CUDA device is available: use {key}=auto or {key}=cpu")
    return torch.device("cuda" if torch.cuda.is_available() and name in ("auto", "gpu", "cuda") else "cpu")


def epoch_batches(cfg: DictConfig, train_images: int, batch_size: int) -> int:
    """Batches of `batch_size` in one training epoch of `train_images`, after overfit_batches or
    limit_train_batches (Lightning's meaning: a float is a fraction, rounded down; an int a number of batches)."""
    batches = math.ceil(train_images / batch_size)
    limit = cfg.trainer.get("overfit_batches") or cfg.trainer.limit_train_batches
    return batches if limit is None else int(batches * limit) if isinstance(limit, float) else min(batches, limit)


def planned_steps(cfg: DictConfig, train_images: int) -> float:
    """Optimizer steps the configured run will take at most (math.inf without a limit), before its trainer exists:
    an epoch's batches times trainer.max_epochs (-1 or None: none), <= trainer.max_steps (the module counts its
    schedule's steps again from the trainer's own counts)."""
    if fast_dev_run := cfg.trainer.get("fast_dev_run"):  # true: 1 batch; an int: that many
        return int(fast_dev_run)
    max_epochs, max_steps = cfg.trainer.max_epochs, cfg.trainer.max_steps
    batches = epoch_batches(cfg, train_images, cfg.data.batch_size)
    steps = math.inf if max_epochs is None or max_epochs < 0 else batches * max_epochs
    return steps if max_steps < 0 else min(steps, max_steps)


def resolve_speed(cfg: DictConfig, train_steps: float = math.inf) -> SpeedChoices:
    """Turn the `auto` values of the speed group and of trainer.precision into concrete choices for
    the device in use and a run of `train_steps` optimizer steps (any other precision is Lightning's)."""
    cuda = pick_device(cfg.trainer.accelerator, "trainer.accelerator").type == "cuda"
    # bf16 autocast where the device computes bf16 natively (emulated, it would be slower than fp32).
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    precision = ("bf16-mixed" if bf16 else "32-true") if cfg.trainer.precision == "auto" else cfg.trainer.precision
    # Compiling pays off on CUDA at once; on a CPU only with bf16 autocast (where it was measured) in a long run.
    compile_auto = cuda or (precision == "bf16-mixed" and train_steps >= CPU_COMPILE_MIN_STEPS)
    return SpeedChoices(
        cuda=cuda,
        compile=bool(compile_auto if cfg.speed.compile == "auto" else cfg.speed.compile),
        precision=str(precision),
        channels_last=bool(cuda if cfg.speed.channels_last == "auto" else cfg.speed.channels_last),
    )
