"""Gated PixelCNN: exact causality without a blind spot, exact incremental sampling, API."""

import pytest
import torch
from torch import nn

from pixelcnn.gated_net import GatedPixelCNN


def randomized(net: nn.Module, std: float = 0.3) -> nn.Module:
    """Random non-zero weights and biases everywhere, including the zero-initialised class biases."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, std)
    return net


# 4 layers of 3x3 after a 7x7 input conv reach 3 + 4 = 7 pixels up, left and right: all of an 8x8 image.
CAUSAL_CONFIGS = [
    dict(layers=4),
    dict(layers=4, dilations=(1, 2)),
    dict(layers=3, kernel_size=5, input_kernel=5, num_classes=3),
    dict(layers=4, dilations=(1, 2), centre_input=True, head="elu"),  # the options of the ablation (issue 28)
    dict(layers=4, head="elu", num_classes=3),
]


@pytest.mark.parametrize("config", CAUSAL_CONFIGS)
def test_output_depends_on_exactly_the_pixels_before(config):
    net = randomized(GatedPixelCNN(levels=4, channels=8, **config)).double().requires_grad_(False)  # input grads only
    size = 8
    labels = torch.tensor([1]) if config.get("num_classes") else None
    for i, j in [(0, 0), (0, 5), (1, 0), (3, 7), (4, 2), (7, 7)]:
        x = torch.rand(1, 1, size, size, dtype=torch.float64, requires_grad=True)
        net(x, labels)[0, :, i, j].sum().backward()
        depends = (x.grad[0, 0] != 0).flatten()  # (H*W,) in raster order
        before = torch.arange(size * size) < i * size + j
        assert torch.equal(depends, before), f"pixel {(i, j)}: wrong dependencies"


INCREMENTAL_CONFIGS = [
    dict(size=(8, 8)),
    dict(size=(6, 9), dilations=(1, 2, 4), kernel_size=5, input_kernel=5),
    dict(size=(7, 5), num_classes=3),
    dict(size=(5, 6), dropout=0.5, dilations=(2, 1)),
    dict(size=(6, 7), centre_input=True, head="elu", dilations=(1, 2, 1, 4), num_classes=3),
    dict(size=(5, 5), centre_input=True),
]


@pytest.mark.parametrize("config", INCREMENTAL_CONFIGS)
def test_incremental_logits_match_the_full_forward_pass(config):
    (height, width), levels, batch = config.pop("size"), 4, 3
    torch.manual_seed(0)
    net = GatedPixelCNN(levels=levels, channels=16, layers=3, **config).eval()
    labels = None
    if net.num_classes:
        labels = torch.randint(0, net.num_classes, (batch,))
        for module in net.modules():  # class biases start at zero: make them matter
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight)
    image = torch.randint(0, levels, (batch, height, width))
    with torch.no_grad():
        full = net(image[:, None].float() / levels, labels)  # (B, L, H, W)
    state = net.start_incremental(batch, height, width, labels)
    for i in range(height):
        for j in range(width):
            step = state.logits(i, j)  # (B, L)
            assert step.shape == (batch, levels)
            assert (step - full[:, :, i, j]).abs().max() <= 1e-4, f"pixel {(i, j)}"
            state.set_pixel(i, j, image[:, i, j])


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(kernel_size=4), "kernel_size must be odd"),
        (dict(kernel_size=0), "kernel_size must be odd"),
        (dict(input_kernel=6), "input_kernel must be odd"),
        (dict(input_kernel=1), "input_kernel must be odd and >= 3"),
        (dict(head="gelu"), "head must be relu or elu"),
    ],
)
def test_invalid_arguments_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        GatedPixelCNN(**bad)


def test_forward_shape_and_labels():
    net = GatedPixelCNN(levels=5, channels=8, layers=2, num_classes=10)
    x = torch.rand(2, 1, 6, 9)
    assert net(x, torch.tensor([0, 9])).shape == (2, 5, 6, 9)
    with pytest.raises(ValueError):
        net(x)  # a conditional model needs labels


def test_dropout_only_in_train_mode():
    net = GatedPixelCNN(channels=8, layers=2, dropout=0.5)
    x = torch.rand(2, 1, 8, 8)
    assert not torch.equal(net.train()(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
