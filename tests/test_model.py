"""The seed PixelCNN: size, masks, and causality proven with gradients."""

import pytest
import torch

from pixelcnn.pixelcnn_net import MaskedConv2d, PixelCNN, causal_mask


def input_gradient(net, x: torch.Tensor, i: int, j: int, labels=None) -> torch.Tensor:
    """|d logits[:, :, i, j] / d x| summed over batch and channels -> (H, W)."""
    x = x.clone().requires_grad_(True)
    out = net(x, labels) if labels is not None else net(x)
    out[:, :, i, j].sum().backward()
    return x.grad.abs().sum(dim=(0, 1))


def raster_before(h: int, w: int, i: int, j: int) -> torch.Tensor:
    """(H, W) bool: pixels strictly before (i, j) in raster order."""
    index = torch.arange(h * w).reshape(h, w)
    return index < i * w + j


def test_default_parameter_count_matches_the_seed():
    assert sum(p.numel() for p in PixelCNN().parameters()) == 307_460


def test_mask_values():
    a, b = causal_mask(3, "A"), causal_mask(3, "B")
    assert a.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert b.tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError):
        causal_mask(3, "C")


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_causality_by_gradient(mask_type):
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 5, mask_type)
    torch.nn.init.uniform_(conv.weight, 0.5, 1.0)  # no accidental zeros among the visible taps
    x = torch.randn(2, 2, 7, 7)
    for i, j in [(0, 0), (3, 3), (6, 2), (2, 6)]:
        grad = input_gradient(lambda t: conv(t), x, i, j)
        allowed = raster_before(7, 7, i, j)
        if mask_type == "B":
            allowed[i, j] = True
        assert (grad[~allowed] == 0).all(), f"{mask_type}: output ({i},{j}) sees a pixel it must not"
        # inside the kernel window, every allowed pixel is seen
        window = torch.zeros(7, 7, dtype=torch.bool)
        window[max(i - 2, 0): i + 3, max(j - 2, 0): j + 3] = True
        assert (grad[allowed & window] > 0).all(), f"{mask_type}: output ({i},{j}) misses a visible pixel"


def test_masked_conv_does_not_edit_weights():
    conv = MaskedConv2d(1, 1, 3, "A")
    torch.nn.init.ones_(conv.weight)
    conv(torch.randn(1, 1, 4, 4)).sum().backward()
    assert (conv.weight == 1).all()  # the mask is applied in forward, never written into the weight
    assert (conv.weight.grad[0, 0] * (1 - causal_mask(3, "A")) == 0).all()  # hidden taps get no gradient


@pytest.mark.parametrize("num_classes", [0, 10])
def test_network_never_sees_the_current_or_later_pixels(num_classes):
    torch.manual_seed(0)
    net = PixelCNN(levels=4, filters=16, residual_blocks=2, num_classes=num_classes)
    x = torch.rand(2, 1, 8, 8)
    labels = torch.tensor([3, 7]) if num_classes else None
    for i in range(8):
        for j in range(8):
            grad = input_gradient(net, x, i, j, labels)
            assert (grad[~raster_before(8, 8, i, j)] == 0).all(), f"output ({i},{j}) depends on (i,j) or later"
    assert input_gradient(net, x, 4, 4, labels)[3, 3] > 0  # and it does use the past


def test_seed_model_has_a_blind_spot():
    """Stacked masked kernels grow a cone that never reaches far up-and-right: the first pixel
    of row 5 cannot see the end of row 4, although those pixels come before it."""
    torch.manual_seed(0)
    net = PixelCNN(filters=16, residual_blocks=2)
    grad = input_gradient(net, torch.rand(1, 1, 8, 8), 5, 0)
    assert raster_before(8, 8, 5, 0)[4, 4:].all()
    assert (grad[4, 4:] == 0).all()  # the blind spot
    assert (grad[4, :4] > 0).all() and grad[2, 5] > 0  # what it does see


def test_conditional_bias_changes_the_output():
    torch.manual_seed(0)
    net = PixelCNN(filters=16, residual_blocks=1, num_classes=10)
    for p in net.parameters():
        if p.dim() == 2 and p.shape[0] == 10:
            torch.nn.init.normal_(p)
    x = torch.rand(2, 1, 6, 6)
    assert not torch.allclose(net(x, torch.tensor([0, 0])), net(x, torch.tensor([1, 1])))
    with pytest.raises(ValueError):
        net(x)


def test_loss_is_in_bits_per_dimension():
    """Uniform logits cost log2(L) bits per pixel (2.0 for 4 levels); fixed logits cost
    -log2 softmax(logits)[level] per pixel, averaged."""
    from pixelcnn.module import ImageModule

    module = ImageModule(levels=4, filters=8, residual_blocks=1)
    torch.nn.init.zeros_(module.net.to_logits.weight)
    torch.nn.init.zeros_(module.net.to_logits.bias)
    images = torch.randint(0, 4, (3, 1, 6, 6), dtype=torch.uint8)
    assert module.mean_bits_per_dim(images, None).item() == pytest.approx(2.0)

    with torch.no_grad():
        module.net.to_logits.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    expected = -torch.log2(torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0))[images.long()].mean()
    assert module.mean_bits_per_dim(images, None).item() == pytest.approx(expected.item(), rel=1e-5)
    assert module.nll_bits_per_pixel(images).shape == (3, 6, 6)


def test_parse_labels():
    from pixelcnn.ops.errors import UserError
    from pixelcnn.commands import sample
    from pixelcnn.data import CLASS_NAMES

    def parse_labels(label, classes: int, n: int):  # a checkpoint's first `classes` class names (Fashion-MNIST's)
        return sample.parse_labels(label, list(CLASS_NAMES)[:classes], n)

    for label in ("sandal", "Sandal", 5):
        labels, nrow = parse_labels(label, 10, 3)
        assert labels.tolist() == [5, 5, 5] and nrow == 8
    assert parse_labels("t-shirt", 10, 2)[0].tolist() == [0, 0]  # the name before the slash
    assert parse_labels("ankle_boot", 10, 1)[0].tolist() == [9]
    labels, nrow = parse_labels("all", 10, 2)  # one row of `n` per class, in class order
    assert labels.tolist() == [c for c in range(10) for _ in range(2)] and nrow == 2
    assert parse_labels(None, 0, 4) == (None, 8)
    for label, classes, message in [("sandal", 0, "needs a class-conditional"), (None, 10, "pass label="),
                                    (10, 10, "is invalid"), ("hat", 10, "is invalid"), (True, 10, "is invalid")]:
        with pytest.raises(UserError, match=message):
            parse_labels(label, classes, 1)


def test_conditional_model_starts_as_the_unconditional_one():
    """Class biases start at zero, so conditioning is learned from an unconditional start."""
    torch.manual_seed(0)
    plain = PixelCNN(filters=8, residual_blocks=2)
    torch.manual_seed(0)
    conditional = PixelCNN(filters=8, residual_blocks=2, num_classes=10)
    conditional.load_state_dict(plain.state_dict(), strict=False)  # same weights, class biases left at zero
    x = torch.rand(3, 1, 6, 6)
    assert torch.allclose(conditional(x, torch.tensor([0, 4, 9])), plain(x))


def test_optimizer_gets_lr_and_weight_decay():
    from pixelcnn.module import ImageModule

    optimizer = ImageModule(filters=4, residual_blocks=0, optim={"lr": 3e-4, "weight_decay": 0.05}).configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (3e-4, 0.05)
