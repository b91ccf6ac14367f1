"""Drawing images from an autoregressive model, pixel by pixel in raster order.

Two exact samplers share one draw rule, so for the same random numbers they give the same images:
- `naive`: runs the whole network once per pixel (H*W full forward passes). The reference.
- `fast`: asks the model for an incremental state (`model.start_incremental`) that caches
  every layer's activations as pixels are generated, so the total work is about one forward
  pass per image (Ramachandran et al. 2017). On CUDA the whole H*W-step loop is captured
  once in a CUDA graph and replayed, which removes the per-step launch overhead.
`complete_fast` is the fast sampler with the top rows of each image given (image completion).

Colour models (`model.image_channels` = C > 1) draw the channels of each pixel in turn (R, G, B),
each from its own softmax; images are (B, C, H, W) then, and (B, H, W) in grey as before.

The draw: `softmax(logits / temperature)` then a multinomial draw by inverse CDF with a
uniform number per pixel and channel drawn up front. Pre-drawn uniforms make runs reproducible from one
seed, let both samplers consume identical randomness, and keep the loop free of host syncs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import Tensor, nn

SamplingMethod = Literal["fast", "naive"]
METHODS = get_args(SamplingMethod)


def valid_temperature(temperature: object) -> bool:
    """The softmax temperature is a number > 0 (0 would divide by zero); the commands' config rules use this too."""
    return isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0


SAMPLE_CHUNK = 1024  # images drawn at once by `sample` (bounds the cached activations; the result is the same)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout) for the block, then back to the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def draw_levels(logits: Tensor, temperature: float, uniforms: Tensor) -> Tensor:
    """Multinomial draw from softmax(logits / T) by inverse CDF. (B, L), (B,) -> (B,) long"""
    cdf = torch.softmax(logits.float() / temperature, dim=-1).cumsum(dim=-1)  # (B, L)
    level = (cdf < uniforms[:, None]).sum(dim=-1)
    return level.clamp_(max=logits.shape[-1] - 1)  # guards u > cdf[-1] from rounding


def draw_uniforms(n: int, height: int, width: int, seed: int | None, device: torch.device, channels: int = 1) -> Tensor:
    """One uniform number per pixel and channel, (n, H*W*C) in raster then channel order, from a
    CPU generator so a seed gives the same images on every device."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.rand(n, height * width * channels, generator=generator).to(device)


def as_images(out: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W) for grey, unchanged for colour: the samplers' result."""
    return out[:, 0] if out.shape[1] == 1 else out


@torch.no_grad()
def sample_naive(model: nn.Module, uniforms: Tensor, height: int, width: int, temperature: float,
                 labels: Tensor | None = None) -> Tensor:
    """Reference sampler: one full forward pass per pixel and channel. -> (B, H, W) or (B, C, H, W) long levels"""
    n, levels, channels = uniforms.shape[0], model.levels, model.image_channels
    weight = next(model.parameters())  # the model input is of the weights' dtype (trainer.precision=bf16-true too)
    image = torch.zeros(n, channels, height, width, device=uniforms.device, dtype=weight.dtype)  # (B, C, H, W) input
    out = torch.zeros(n, channels, height, width, dtype=torch.long, device=uniforms.device)
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                logits = model(image, labels)[:, c * levels : (c + 1) * levels, i, j]  # (B, L)
                out[:, c, i, j] = draw_levels(logits, temperature, uniforms[:, (i * width + j) * channels + c])
                image[:, c, i, j] = out[:, c, i, j] / levels
    return as_images(out)


@torch.no_grad()
def _fast_loop(model: nn.Module, uniforms: Tensor, out: Tensor, temperature: float, labels: Tensor | None,
               kept_rows: int = 0) -> None:
    """Fill `out` (B, C, H, W) in raster order, channels in turn; rows [0, kept_rows) keep their values (completion)."""
    n, channels, height, width = out.shape
    state = model.start_incremental(n, height, width, labels)
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                logits = state.logits(i, j, c)  # (B, L); kept pixels too: the protocol fills its caches in raster order
                if i >= kept_rows:
                    out[:, c, i, j] = draw_levels(logits, temperature, uniforms[:, (i * width + j) * channels + c])
                state.set_pixel(i, j, out[:, c, i, j], c)


@torch.no_grad()
def complete_fast(model: nn.Module, known: Tensor, rows: int, uniforms: Tensor, temperature: float = 1.0,
                  labels: Tensor | None = None) -> Tensor:
    """Image completion: keep rows [0, rows) of `known` (B, H, W) grey or (B, C, H, W), draw the others.
    -> the same shape, long. Every pixel is conditioned on all pixels above it, so this samples exactly
    from p(bottom | top), by `sample_fast`'s draw rule; `uniforms` (B, H*W*C) as from `draw_uniforms`."""
    out = known.long().reshape(len(known), model.image_channels, *known.shape[-2:]).clone()  # (B, C, H, W)
    _fast_loop(model, uniforms, out, temperature, labels, kept_rows=rows)
    return as_images(out)


class _CapturedSampler:
    """A CUDA graph of the whole fast sampling loop for one (model, batch, size, T, labels?) key."""

    def __init__(self, model: nn.Module, n: int, height: int, width: int, temperature: float, conditional: bool,
                 device: torch.device):
        self.uniforms = torch.zeros(n, height * width * model.image_channels, device=device)
        self.labels = torch.zeros(n, dtype=torch.long, device=device) if conditional else None
        self.out = torch.zeros(n, model.image_channels, height, width, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the graph, as CUDA graph capture requires
            _fast_loop(model, self.uniforms, self.out, temperature, self.labels)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            _fast_loop(model, self.uniforms, self.out, temperature, self.labels)

    def __call__(self, uniforms: Tensor, labels: Tensor | None) -> Tensor:
        self.uniforms.copy_(uniforms)
        if labels is not None:
            self.labels.copy_(labels)
        self.graph.replay()
        return as_images(self.out.clone())


@torch.no_grad()
def sample_fast(model: nn.Module, uniforms: Tensor, height: int, width: int, temperature: float,
                labels: Tensor | None = None) -> Tensor:
    """Exact sampler with per-layer activation caching. -> (B, H, W) or (B, C, H, W) long levels"""
    out = torch.zeros(uniforms.shape[0], model.image_channels, height, width, dtype=torch.long, device=uniforms.device)
    if not uniforms.is_cuda:
        _fast_loop(model, uniforms, out, temperature, labels)
        return as_images(out)
    # Graphs are cached on the model and read the weights in place, so training updates are seen.
    # Moving the model (Lightning sends it to the CPU and back) gives it new storage: then the
    # graphs would read freed memory, so they are dropped and captured again.
    storage = tuple(p.data_ptr() for p in model.parameters())
    if model.__dict__.get("_captured_storage") != storage:
        model.__dict__["_captured_storage"], model.__dict__["_captured_samplers"] = storage, {}
    cache = model.__dict__["_captured_samplers"]
    key = (uniforms.shape[0], height, width, float(temperature), labels is not None)
    if key not in cache:
        cache[key] = _CapturedSampler(model, uniforms.shape[0], height, width, temperature, labels is not None,
                                      uniforms.device)
    return cache[key](uniforms, labels)


@torch.no_grad()
def sample(model: nn.Module, n: int, height: int, width: int, temperature: float = 1.0, seed: int | None = None,
           labels: Tensor | None = None, method: SamplingMethod = "fast") -> Tensor:
    """Draw n images as (n, H, W) grey or (n, C, H, W) colour long levels in [0, model.levels). The
    model is put in eval mode for the draw and restored after."""
    if not valid_temperature(temperature):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if method not in METHODS:
        raise ValueError(f"method must be 'fast' or 'naive', got {method!r}")
    device = next(model.parameters()).device
    # (n, H*W*C): all drawn first, so chunks change nothing
    uniforms = draw_uniforms(n, height, width, seed, device, model.image_channels)
    labels = labels.to(device) if labels is not None else None
    draw = sample_fast if method == "fast" else sample_naive
    with eval_mode(model):  # in chunks: the activations of a large n need not fit in memory at once
        return torch.cat([draw(model, uniforms[start : start + SAMPLE_CHUNK], height, width, temperature,
                               labels[start : start + SAMPLE_CHUNK] if labels is not None else None)
                          for start in range(0, n, SAMPLE_CHUNK)])
