"""Samplers: the fast (cached) sampler is exact, and the draw follows softmax(logits / T)."""

import pytest
import torch

from pixelcnn.gated_net import GatedPixelCNN
from pixelcnn.pixelcnn_net import PixelCNN
from pixelcnn.sampling import draw_levels, draw_uniforms, sample, sample_fast, sample_naive


def randomized(net: torch.nn.Module) -> torch.nn.Module:
    """Give class embeddings non-zero values so conditioning matters, and freeze in eval mode."""
    torch.manual_seed(1)
    for p in net.parameters():
        if p.dim() == 2 and p.shape[0] == 10:
            torch.nn.init.normal_(p)
    return net.eval()


MODELS = {
    "seed": lambda: PixelCNN(levels=4, filters=32, residual_blocks=2),
    "seed-conditional": lambda: PixelCNN(levels=4, filters=32, residual_blocks=2, num_classes=10),
    "seed-8-levels": lambda: PixelCNN(levels=8, filters=16, residual_blocks=1),
    "gated": lambda: GatedPixelCNN(levels=4, channels=16, layers=3),
    "gated-conditional-dilated": lambda: GatedPixelCNN(levels=4, channels=16, layers=4, dilations=(1, 2),
                                                       num_classes=10),
}


@pytest.mark.parametrize("name", MODELS)
def test_fast_sampler_matches_naive_and_full_forward(name):
    torch.manual_seed(0)
    net = randomized(MODELS[name]())
    labels = torch.arange(6) % 10 if net.num_classes else None
    uniforms = draw_uniforms(6, 7, 9, seed=3, device=torch.device("cpu"))
    naive = sample_naive(net, uniforms, 7, 9, temperature=1.0, labels=labels)
    fast = sample_fast(net, uniforms, 7, 9, temperature=1.0, labels=labels)
    assert torch.equal(naive, fast)  # same random draws -> same images
    assert len(fast.unique()) > 1

    # Step through the finished image: the incremental logits equal the full forward pass.
    full = net(fast[:, None].float() / net.levels, labels)  # (B, L, H, W)
    state = net.start_incremental(6, 7, 9, labels)
    worst = 0.0
    for i in range(7):
        for j in range(9):
            worst = max(worst, (state.logits(i, j) - full[:, :, i, j]).abs().max().item())
            state.set_pixel(i, j, fast[:, i, j])
    assert worst < 1e-4


def test_draw_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(40_000, 1)
    levels = draw_levels(logits, 1.0, torch.rand(40_000, generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(levels, minlength=4).float() / 40_000
    assert torch.allclose(frequencies, torch.softmax(logits[0], -1), atol=0.01)
    hot = draw_levels(logits, 0.5, torch.rand(40_000, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(torch.bincount(hot, minlength=4).float() / 40_000, torch.softmax(logits[0] / 0.5, -1),
                          atol=0.01)
    assert draw_levels(logits[:1], 1.0, torch.tensor([1.0])).item() == 3  # u at the top edge stays in range


def test_sample_is_reproducible_and_in_range():
    net = PixelCNN(levels=4, filters=16, residual_blocks=1)
    a = sample(net, 4, 6, 6, temperature=1.0, seed=7)
    b = sample(net, 4, 6, 6, temperature=1.0, seed=7)
    c = sample(net, 4, 6, 6, temperature=1.0, seed=8)
    assert a.shape == (4, 6, 6) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 3
    assert net.training  # sampling restores the mode it found
    with pytest.raises(ValueError, match="temperature"):
        sample(net, 1, 4, 4, temperature=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_sampler_is_exact_and_survives_a_device_round_trip():
    net = randomized(PixelCNN(levels=4, filters=32, residual_blocks=2)).cuda()
    uniforms = draw_uniforms(8, 6, 6, seed=0, device=torch.device("cuda"))
    naive = sample_naive(net, uniforms, 6, 6, temperature=1.0)
    assert torch.equal(sample_fast(net, uniforms, 6, 6, temperature=1.0), naive)  # captured, then replayed
    assert torch.equal(sample_fast(net, uniforms, 6, 6, temperature=1.0), naive)
    net.cpu().cuda()  # new parameter storage: the graph must be captured again, not replayed
    assert torch.equal(sample_fast(net, uniforms, 6, 6, temperature=1.0), naive)


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_temperature_reaches_the_draw(method):
    """A very low temperature makes every draw the most likely level: the images equal a greedy
    (argmax) decode, which T = 1 images do not."""
    torch.manual_seed(0)
    net = randomized(MODELS["seed"]())
    cold = sample(net, 6, 5, 5, temperature=1e-4, seed=0, method=method)
    greedy = torch.zeros(6, 5, 5, dtype=torch.long)
    with torch.no_grad():
        for i in range(5):
            for j in range(5):
                greedy[:, i, j] = net(greedy[:, None].float() / net.levels)[:, :, i, j].argmax(1)
    assert torch.equal(cold, greedy)
    assert not torch.equal(sample(net, 6, 5, 5, temperature=1.0, seed=0, method=method), greedy)


def test_sampling_runs_in_eval_mode():
    """Dropout is off while sampling: a model in train mode samples what its eval-mode self does.
    (The naive sampler calls forward, where dropout lives; the incremental one never applies it.)"""
    torch.manual_seed(0)
    net = GatedPixelCNN(levels=4, channels=16, layers=2, dropout=0.5)
    in_eval = sample(net.eval(), 4, 6, 6, seed=3, method="naive")
    assert torch.equal(sample(net.train(), 4, 6, 6, seed=3, method="naive"), in_eval)
    assert torch.equal(sample(net, 4, 6, 6, seed=3, method="fast"), in_eval)
    assert net.training


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be 'fast' or 'naive'"):
        sample(MODELS["seed"](), 1, 4, 4, method="quick")
