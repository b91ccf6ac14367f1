"""Colour PixelCNNs (image_channels=3): R, G, B of a pixel predicted in turn, with no look into the
future, no blind spot (gated), exact fast sampling, and the loss counting every channel."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pixelcnn.gated_net import GatedPixelCNN
from pixelcnn.pixelcnn_net import PixelCNN
from pixelcnn.module import ImageModule
from pixelcnn.sampling import complete_fast, draw_uniforms, sample_fast, sample_naive

C, LEVELS, SIZE = 3, 4, 6


def randomized(net: nn.Module, std: float = 0.05) -> nn.Module:
    """Random positive weights and biases everywhere (class biases included), in float64: with a
    positive input no ReLU is dead and every gate's slope is positive (small: no tanh saturates), so
    every path shows in a gradient."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, std).abs_()
    return net.double().eval().requires_grad_(False)


NETS = {
    "seed": lambda: PixelCNN(levels=LEVELS, filters=12, residual_blocks=2, image_channels=C),
    "seed-conditional": lambda: PixelCNN(levels=LEVELS, filters=8, residual_blocks=1, num_classes=3, image_channels=C),
    # 7x7 input + 3 layers of 3x3 reach 3 + 3 = 6 pixels in every direction: all of a 6x6 image.
    "gated": lambda: GatedPixelCNN(levels=LEVELS, channels=9, layers=3, image_channels=C),
    "gated-conditional-dilated": lambda: GatedPixelCNN(levels=LEVELS, channels=8, layers=3, dilations=(1, 2),
                                                       num_classes=3, image_channels=C),
    "gated-centred-elu": lambda: GatedPixelCNN(levels=LEVELS, channels=9, layers=3, centre_input=True, head="elu",
                                               image_channels=C),
}


def dependencies(net: nn.Module, i: int, j: int, c: int, labels) -> torch.Tensor:
    """Which input values (C, H, W) the logits of channel c at pixel (i, j) depend on."""
    x = torch.rand(1, C, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    net(x, labels)[0, c * LEVELS : (c + 1) * LEVELS, i, j].sum().backward()
    return x.grad[0] != 0


def before(i: int, j: int, c: int) -> torch.Tensor:
    """(C, H, W): the values that come before channel c of pixel (i, j) in raster, then channel order."""
    pixel = torch.arange(SIZE * SIZE).view(SIZE, SIZE)
    earlier = (pixel < i * SIZE + j)[None].expand(C, -1, -1).clone()
    earlier[:c, i, j] = True
    return earlier


@pytest.mark.parametrize("name", NETS)
def test_no_channel_or_pixel_sees_itself_or_the_future(name):
    net = randomized(NETS[name]())
    labels = torch.tensor([1]) if net.num_classes else None
    for i, j in [(0, 0), (0, 3), (2, 0), (3, 4), (5, 5)]:
        for c in range(C):
            depends, allowed = dependencies(net, i, j, c, labels), before(i, j, c)
            assert not (depends & ~allowed).any(), f"{name}: channel {c} of {(i, j)} sees the future"
            if name.startswith("gated"):  # no blind spot: every earlier value is seen
                assert torch.equal(depends, allowed), f"{name}: channel {c} of {(i, j)} misses earlier values"
            else:  # the seed model sees at least the earlier channels of its own pixel and its left neighbour
                assert depends[:c, i, j].all() and (j == 0 or depends[:, i, j - 1].all())


def test_grey_masks_are_unchanged():
    """With one channel the colour generalisation builds the grey networks (307,460 parameters)."""
    assert sum(p.numel() for p in PixelCNN().parameters()) == 307_460
    assert sum(p.numel() for p in PixelCNN(image_channels=3).parameters()) == 307_460 + 128 * 2 * 49 + 129 * 8  # 2 more input channels, 8 more logits


@pytest.mark.parametrize("name", NETS)
def test_fast_sampler_equals_naive_in_colour(name):
    torch.manual_seed(0)
    net = NETS[name]().eval()
    with torch.no_grad():  # class biases start at zero: make them matter
        for p in net.parameters():
            if p.dim() == 2 and p.shape[0] == 3:
                p.normal_()
    labels = torch.arange(4) % 3 if net.num_classes else None
    uniforms = draw_uniforms(4, 5, 6, seed=3, device=torch.device("cpu"), channels=C)
    naive = sample_naive(net, uniforms, 5, 6, temperature=1.0, labels=labels)
    fast = sample_fast(net, uniforms, 5, 6, temperature=1.0, labels=labels)
    assert fast.shape == (4, C, 5, 6)
    assert torch.equal(naive, fast)
    assert len(fast.unique()) > 1

    # Step through the finished image: every channel's incremental logits equal the full forward pass.
    full = net(fast.float() / LEVELS, labels)  # (B, C*L, H, W)
    state = net.start_incremental(4, 5, 6, labels)
    worst = 0.0
    for i in range(5):
        for j in range(6):
            for c in range(C):
                expected = full[:, c * LEVELS : (c + 1) * LEVELS, i, j]
                worst = max(worst, (state.logits(i, j, c) - expected).abs().max().item())
                state.set_pixel(i, j, fast[:, c, i, j], c)
    assert worst < 1e-4
    # Completion keeps the top rows and redraws the rest exactly as the sampler does.
    kept = complete_fast(net, fast, 2, uniforms, 1.0, labels)
    assert torch.equal(kept, fast)  # same uniforms: the same image


def test_colour_loss_counts_every_channel():
    """Bits/dim averages over C*H*W: a model that knows nothing costs log2(L) per value; with one
    channel's logits pushed to the right level, that channel costs ~0 and the mean drops by a third."""
    module = ImageModule(arch="pixelcnn", levels=LEVELS, image_size=SIZE, filters=8, residual_blocks=1,
                            image_channels=C)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    images = torch.randint(0, LEVELS, (2, C, SIZE, SIZE), dtype=torch.uint8)
    assert module.image_bits_per_dim(images).allclose(torch.full((2,), math.log2(LEVELS), dtype=torch.float64))
    with torch.no_grad():
        module.net.to_logits.bias[LEVELS + 1] = 100.0  # channel G: level 1 certain
    images[:, 1] = 1
    assert module.image_bits_per_dim(images).allclose(torch.full((2,), math.log2(LEVELS) * 2 / 3, dtype=torch.float64))


def test_colour_class_marginal_counts_every_channel():
    """A conditional colour model scores an image without its label by the marginal over classes:
    -log2(mean_k 2^-bits(x | k)) / (C*H*W), where bits(x | k) is the whole image's, all C channels."""
    module = ImageModule(arch="pixelcnn", levels=LEVELS, image_size=SIZE, filters=8, residual_blocks=1,
                            num_classes=3, image_channels=C)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():  # the class biases too (they start at zero), so each class scores differently
            p.normal_(0.0, 0.3)
    images = torch.randint(0, LEVELS, (4, C, SIZE, SIZE), dtype=torch.uint8)
    dims = C * SIZE * SIZE
    per_class = torch.stack([module.image_bits_per_dim(images, torch.full((4,), k)) for k in range(3)], 1)  # (4, 3)
    assert (per_class.max(1).values - per_class.min(1).values > 0.01).all()  # the classes disagree
    expected = -(torch.logsumexp(-per_class * dims * math.log(2), 1) - math.log(3)) / math.log(2) / dims
    assert torch.allclose(module.image_bits_per_dim(images), expected, rtol=0, atol=1e-9)


def test_too_narrow_for_three_colour_groups_is_one_error():
    from hydra import compose, initialize_config_dir

    from pixelcnn.ops.rules import validate

    from pixelcnn.ops.errors import UserError

    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        validate(compose("train", overrides=["data.channels=3", "model.filters=6"]), "train")  # 3 groups of 2, 1 in the blocks
        for overrides, message in [(["model.filters=4"], "model.filters=4 is too small for data.channels=3"),
                                   (["model=gated", "model.channels=2"], "model.channels=2 is too small")]:
            with pytest.raises(UserError, match=message):
                validate(compose("train", overrides=["data.channels=3", *overrides]), "train")
