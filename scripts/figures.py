"""The README's figures, made from the real model classes: `python scripts/figures.py [--out docs]`.

- `masks.png`: the causal masks of the seed model's convolutions (`pixelcnn.pixelcnn_net.causal_mask`): type A
  (first layer, 7x7) hides the centre pixel, type B (later layers, 3x3) lets a pixel see its own features.
- `receptive_field.png`: which input pixels one output pixel's logits depend on, found by gradients as the
  causality tests do (tests/test_model.py, tests/test_gated.py): backprop from the logits of one pixel to
  the input; a nonzero gradient puts an input pixel in the receptive field. Pixels that come earlier in
  raster order but get no gradient are the blind spot: the seed PixelCNN has one, the Gated PixelCNN none.
  Each panel's title also counts, over the whole image, the (output pixel, earlier pixel) pairs it cannot see
  (`unseen_pairs`): a gated stack too shallow for the image misses far pixels without a blind spot's wedge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

from pixelcnn.gated_net import GatedPixelCNN  # noqa: E402
from pixelcnn.pixelcnn_net import PixelCNN, causal_mask  # noqa: E402

# Cell classes of the receptive-field picture, and their colours.
LATER, SEEN, BLIND, TARGET = 0, 1, 2, 3
COLOURS = ListedColormap(["white", "#4c72b0", "#dd8452", "#c44e52"])


CONF = Path(__file__).resolve().parents[1] / "conf"
SHAPE_KEYS = ("layers", "kernel_size", "input_kernel", "dilations", "residual_blocks")  # what shapes the field


def configured(group_file: str, overrides: dict | None = None) -> dict:
    """The options of a config file's model that shape the receptive field (conf/model/*.yaml, or an
    experiment's overrides on top), so that the figure shows what `python train.py model=...` trains."""
    group = OmegaConf.load(CONF / group_file)
    model = OmegaConf.to_container(group.get("model", group))  # a global-package group nests it under model:
    return {key: value for key, value in {**model, **(overrides or {})}.items() if key in SHAPE_KEYS}


def models() -> dict[str, nn.Module]:
    """The two architectures as their config groups set them up (depth, kernels, dilations: what shapes the
    receptive field); the width is cut to 16 channels, which does not change it and keeps this fast."""
    return {"seed PixelCNN (model=pixelcnn)": PixelCNN(filters=16, **configured("model/pixelcnn.yaml")),
            "Gated PixelCNN (model=gated)": GatedPixelCNN(channels=16, **configured("model/gated.yaml"))}


def randomized(net: nn.Module) -> nn.Module:
    """`net` with random weights (normal, std 0.3), so that no dependence is hidden by a dead unit or a
    zero weight (the weights of a network passed in are overwritten)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, 0.3)
    return net


def receptive_field(net: nn.Module, size: int, pixel: tuple[int, int]) -> np.ndarray:
    """(size, size) bool: the input pixels that the logits at `pixel` depend on, for a batch of random images."""
    net = randomized(net)
    x = torch.rand(8, 1, size, size, requires_grad=True)  # (B, 1, H, W)
    net(x)[:, :, pixel[0], pixel[1]].sum().backward()  # logits (B, L, H, W) at one pixel
    return (x.grad.abs().sum(dim=(0, 1)) > 0).numpy()


def unseen_pairs(net: nn.Module, size: int) -> int:
    """How many (output pixel, earlier input pixel) pairs of a size x size image the network cannot see (zero
    gradient), of size^2 (size^2 - 1) / 2. One backward pass: image b of the batch asks only for pixel b's logits,
    and images do not mix, so image b's input gradient is pixel b's receptive field."""
    n, net = size * size, randomized(net)
    pixels = torch.arange(n)
    seen = torch.zeros(n, n, dtype=torch.bool)  # row b: pixel b's field, over a few batches (a ReLU may hide one)
    for _ in range(3):
        x = torch.rand(n, 1, size, size, requires_grad=True)  # (n, 1, H, W): one image per output pixel
        net(x)[pixels, :, pixels // size, pixels % size].sum().backward()  # (n, L) logits
        seen |= x.grad.flatten(1) != 0
    earlier = pixels[None, :] < pixels[:, None]
    return int((earlier & ~seen).sum())


def classify(field: np.ndarray, pixel: tuple[int, int]) -> np.ndarray:
    """(H, W) of LATER / SEEN / BLIND / TARGET: BLIND = before `pixel` in raster order yet not seen."""
    height, width = field.shape
    before = np.arange(height * width).reshape(height, width) < pixel[0] * width + pixel[1]
    cells = np.where(field, SEEN, np.where(before, BLIND, LATER))
    cells[pixel] = TARGET
    return cells


def draw_grid(ax, values: np.ndarray, cmap, title: str) -> None:
    ax.imshow(values, cmap=cmap, vmin=0, vmax=cmap.N - 1)
    ax.set_xticks(np.arange(-0.5, values.shape[1]))  # one line between every two cells
    ax.set_yticks(np.arange(-0.5, values.shape[0]))
    ax.grid(color="grey", linewidth=0.5)
    ax.tick_params(length=0, labelbottom=False, labelleft=False)
    ax.set_title(title, fontsize=10)


def draw_masks(path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.6), layout="constrained")
    for ax, (mask_type, k, role) in zip(axes, [("A", 7, "first layer"), ("B", 3, "every later layer")]):
        mask = causal_mask(k, mask_type).numpy()  # (k, k): 1 where the kernel may look
        draw_grid(ax, mask, ListedColormap(["white", "#4c72b0"]), f"mask {mask_type} ({k}x{k}, {role})")
        ax.add_patch(plt.Rectangle((k // 2 - 0.5, k // 2 - 0.5), 1, 1, fill=False, edgecolor="#c44e52", linewidth=2))
    fig.suptitle("Masked convolutions: blue taps are used; red box: the kernel's centre (the pixel being predicted)",
                 fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def draw_receptive_fields(fields: dict[str, np.ndarray], unseen: dict[str, int], pixel: tuple[int, int],
                          path: Path) -> None:
    fig, axes = plt.subplots(1, len(fields), figsize=(3.4 * len(fields), 4.3), layout="constrained")
    for ax, (name, field) in zip(axes, fields.items()):
        cells, n = classify(field, pixel), field.size
        draw_grid(ax, cells, COLOURS, f"{name}\n{int((cells == BLIND).sum())} blind-spot pixels here; over the image,\n"
                                      f"{unseen[name]:,} of {n * (n - 1) // 2:,} (pixel, earlier pixel) pairs unseen")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS(c)) for c in (TARGET, SEEN, BLIND)]
    fig.legend(handles, ["predicted pixel", "seen (nonzero gradient)", "earlier but unseen: blind spot"],
               loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def main(out: Path, size: int) -> dict[str, np.ndarray]:
    """Write masks.png and receptive_field.png into `out`; return each model's receptive field."""
    out.mkdir(parents=True, exist_ok=True)
    pixel = (size // 2, size // 2)
    fields = {name: receptive_field(net, size, pixel) for name, net in models().items()}
    unseen = {name: unseen_pairs(net, size) for name, net in models().items()}
    draw_masks(out / "masks.png")
    draw_receptive_fields(fields, unseen, pixel, out / "receptive_field.png")
    return fields


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs", help="output folder")
    parser.add_argument("--size", type=int, default=16, help="image size (the data's: 16)")
    args = parser.parse_args()
    for name, field in main(args.out, args.size).items():
        print(f"{name}: sees {int(field.sum())} pixels")
