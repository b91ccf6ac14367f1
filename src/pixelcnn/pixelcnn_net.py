"""The seed PixelCNN: masked convolutions, residual blocks, and the network.

An autoregressive model of an image x with H x W pixels factorises
p(x) = prod_p p(x_p | x_<p) in raster order. Masked convolutions make every output
position depend only on input positions that come before it, so one forward pass gives
the logits of every pixel at once (training) while sampling stays sequential.

References:
- van den Oord, Kalchbrenner, Kavukcuoglu 2016, "Pixel Recurrent Neural Networks"
  (masked convolutions of type A and B, the residual block used here).
- Foster, "Generative Deep Learning" (2nd ed.), chapter 5: the seed architecture and the
  16x16 / 4-level Fashion-MNIST set-up this project reproduces.
- Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models":
  each layer's activation at each pixel is computed once and cached while sampling
  (see `PixelCNN.start_incremental`).
- UvA deep learning tutorial 12, "Autoregressive Image Modeling" (class layout).

Colour (`image_channels` = 3): as in van den Oord et al. 2016 (section 3.4), each layer's channels
are split into R, G, B groups (`channel_groups`) and, at the current pixel only, a channel of group
g sees the input channels of groups < g (type A) or <= g (type B): R is predicted from the pixels
before, G also from R, B from R and G. Every 1x1 conv is then a masked one too. With one image
channel these masks are the plain spatial ones, and the network is exactly the grey one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_KERNEL_MIN = 3  # an input conv's least kernel: a type-A 1x1 would see nothing (it masks the centre)


def odd_kernel(size: object, least: int = 1) -> bool:
    """Whether a masked conv can have this kernel size: odd, so that the kernel has a centre (the
    pixel being predicted), and >= `least`. The networks check their arguments with it, and so
    do the config rules (`pixelcnn.ops.rules`), once, before any work."""
    return isinstance(size, int) and not isinstance(size, bool) and size >= least and size % 2 == 1


def causal_mask(kernel_size: int, mask_type: Literal["A", "B"]) -> Tensor:
    """(k, k) mask: 1 where the kernel may look. Rows below the centre and pixels right of
    the centre are hidden; type A also hides the centre pixel itself."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    k = kernel_size
    mask = torch.ones(k, k)
    mask[k // 2, k // 2 + (mask_type == "B") :] = 0
    mask[k // 2 + 1 :, :] = 0
    return mask


def channel_groups(channels: int, colours: int) -> Tensor:
    """The colour group of each of `channels` feature channels: contiguous blocks. -> (channels,) in 0..colours-1"""
    return torch.arange(channels) * colours // channels


def channel_mask(out_groups: Tensor, in_groups: Tensor, mask_type: Literal["A", "B"]) -> Tensor:
    """(Cout, Cin) mask of the centre tap: output group g sees input groups < g (A) or <= g (B)."""
    later = out_groups[:, None] > in_groups[None, :]
    return (later if mask_type == "A" else later | (out_groups[:, None] == in_groups[None, :])).float()


def colour_mask(kernel_size: int, mask_type: Literal["A", "B"], out_groups: Tensor, in_groups: Tensor) -> Tensor:
    """(Cout, Cin, k, k) mask of a masked conv over colour groups: the spatial type-B mask, with the
    centre tap masked by `channel_mask`. One group everywhere gives back `causal_mask`."""
    centre = kernel_size // 2
    mask = causal_mask(kernel_size, "B").repeat(len(out_groups), len(in_groups), 1, 1)
    mask[:, :, centre, centre] = channel_mask(out_groups, in_groups, mask_type)
    return mask


class MaskedConv2d(nn.Conv2d):
    """A same-padded convolution that sees only pixels before (A) or up to (B) the centre.

    The mask is applied to the weight in `forward` (never written into `weight.data`), so the
    optimizer state and the masked-out parameters stay untouched and the mask is a buffer
    that moves with the module. With `colours` > 1 the centre tap is masked over colour groups
    (`colour_mask`); a 1x1 conv of one colour needs no mask at all (`mask` is None).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: Literal["A", "B"],
                 colours: int = 1):
        if not odd_kernel(kernel_size):
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.mask_type, self.colours = mask_type, colours
        if colours > 1:
            mask = colour_mask(kernel_size, mask_type, channel_groups(out_channels, colours),
                               channel_groups(in_channels, colours))
        else:
            mask = None if (kernel_size, mask_type) == (1, "B") else causal_mask(kernel_size, mask_type)[None, None]
        self.register_buffer("mask", mask, persistent=False)

    def masked_weight(self) -> Tensor:  # (Cout, Cin, k, k)
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.padding)

    def pixel_taps(self) -> list[tuple[int, Tensor]]:
        """The masked kernel as one matrix per kernel row, for `at_pixel`: [(row, (ncols*Cin, Cout))].

        Only rows up to the centre, and in the centre row only the columns the mask keeps, can
        be non-zero, so only those are kept. Computed once per sampling run, not per pixel.
        """
        k, centre = self.kernel_size[0], self.kernel_size[0] // 2
        weight = self.masked_weight()  # (Cout, Cin, k, k)
        taps = []
        for row in range(centre + 1):  # in colour, type A keeps part of the centre tap
            ncols = k if row < centre else centre + (self.mask_type == "B" or self.colours > 1)
            if ncols:  # (Cout, Cin, ncols) -> (ncols*Cin, Cout), matching a channels-last input slice
                taps.append((row, weight[:, :, row, :ncols].permute(2, 1, 0).reshape(-1, self.out_channels)))
        return taps

    def at_pixel(self, padded: Tensor, taps: list[tuple[int, Tensor]], i: int, j: int) -> Tensor:
        """Output at pixel (i, j) alone, from the channels-last input zero-padded by k//2.

        (B, H+2p, W+2p, Cin) -> (B, Cout). Each kernel row is a strided view of the input, so
        no patch is copied.
        """
        out = self.bias
        for row, weight in taps:
            ncols = weight.shape[0] // self.in_channels
            out = torch.addmm(out, padded[:, i + row, j : j + ncols].reshape(padded.shape[0], -1), weight)
        return out


def conv1x1_at(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution (masked or not) applied to one pixel's feature vector. (B, Cin) -> (B, Cout)"""
    weight = conv.masked_weight() if isinstance(conv, MaskedConv2d) else conv.weight
    return F.linear(x, weight.flatten(1), conv.bias)


class ClassBias(nn.Module):
    """A learned per-class bias added to a layer's output (class conditioning).

    With num_classes == 0 the model is unconditional and this module adds nothing.
    """

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, channels) if num_classes > 0 else None
        if self.embedding is not None:
            nn.init.zeros_(self.embedding.weight)  # start as the unconditional model

    def forward(self, labels: Tensor | None) -> Tensor | float:  # (B,) -> (B, C) or 0
        if self.embedding is None:
            return 0.0
        if labels is None:
            raise ValueError("this model is class-conditional: pass labels")
        return self.embedding(labels)


def spatial(bias: Tensor | float) -> Tensor | float:
    """(B, C) -> (B, C, 1, 1) so a per-class bias broadcasts over the image."""
    return bias[:, :, None, None] if isinstance(bias, Tensor) else bias


class ResidualBlock(nn.Module):
    """1x1 conv to half width -> ReLU -> masked 3x3 (B) -> ReLU -> 1x1 conv back -> ReLU, plus the skip.
    The 1x1 convs are masked (B) over `colours` groups; with one colour they are plain 1x1 convs."""

    def __init__(self, filters: int, num_classes: int = 0, kernel_size: int = 3, colours: int = 1):
        super().__init__()
        hidden = filters // 2
        self.reduce = MaskedConv2d(filters, hidden, 1, "B", colours)
        self.masked = MaskedConv2d(hidden, hidden, kernel_size, "B", colours)
        self.expand = MaskedConv2d(hidden, filters, 1, "B", colours)
        self.cond_reduce = ClassBias(num_classes, hidden)
        self.cond_masked = ClassBias(num_classes, hidden)
        self.cond_expand = ClassBias(num_classes, filters)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # (B, F, H, W)
        h = F.relu(self.reduce(x) + spatial(self.cond_reduce(labels)))  # (B, F/2, H, W)
        h = F.relu(self.masked(h) + spatial(self.cond_masked(labels)))  # (B, F/2, H, W)
        h = F.relu(self.expand(h) + spatial(self.cond_expand(labels)))  # (B, F, H, W)
        return x + h


class PixelCNN(nn.Module):
    """The seed PixelCNN: 7x7 masked conv A -> residual blocks -> two masked 1x1 B -> 1x1 to logits.

    Input: pixel levels scaled to [0, 1) as `level / levels`, shape (B, C, H, W), C = `image_channels`.
    Output: logits over the `levels` levels of every pixel and channel, shape (B, C * levels, H, W)
    (channel c's logits are [c * levels, (c + 1) * levels)). With the defaults it has 307,460
    parameters. It has the classic blind spot: stacked
    masked 3x3 kernels never reach pixels up and to the right beyond a growing cone.
    """

    def __init__(
        self,
        levels: int = 4,
        filters: int = 128,
        residual_blocks: int = 5,
        input_kernel: int = 7,
        num_classes: int = 0,
        image_channels: int = 1,
    ):
        super().__init__()
        if not odd_kernel(input_kernel, INPUT_KERNEL_MIN):
            raise ValueError(f"input_kernel must be odd and >= {INPUT_KERNEL_MIN}, got {input_kernel}")
        if image_channels > 1 and filters // 2 < image_channels:
            raise ValueError(f"filters must be >= {2 * image_channels} for {image_channels} colour groups, "
                             f"got {filters}")
        self.levels, self.image_channels = levels, image_channels
        self.num_classes = num_classes
        colours = image_channels
        self.input_conv = MaskedConv2d(colours, filters, input_kernel, "A", colours)
        self.cond_input = ClassBias(num_classes, filters)
        self.blocks = nn.ModuleList(ResidualBlock(filters, num_classes, colours=colours)
                                    for _ in range(residual_blocks))
        # The book's "masked 1x1 type B" convs: in grey a 1x1 type-B mask keeps the only tap (plain 1x1 convs).
        self.head = nn.ModuleList(MaskedConv2d(filters, filters, 1, "B", colours) for _ in range(2))
        self.cond_head = nn.ModuleList(ClassBias(num_classes, filters) for _ in range(2))
        self.to_logits = MaskedConv2d(filters, colours * levels, 1, "B", colours)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # (B, C, H, W) -> (B, C*L, H, W)
        h = F.relu(self.input_conv(x) + spatial(self.cond_input(labels)))  # (B, F, H, W)
        for block in self.blocks:
            h = block(h, labels)
        for conv, cond in zip(self.head, self.cond_head):
            h = F.relu(conv(h) + spatial(cond(labels)))
        return self.to_logits(h)

    def start_incremental(self, batch_size: int, height: int, width: int, labels: Tensor | None = None):
        return IncrementalPixelCNN(self, batch_size, height, width, labels)


class IncrementalPixelCNN:
    """Sampling state of a `PixelCNN` that computes every activation exactly once.

    Every layer's output at pixel p depends only on its input at pixels up to p in raster
    order, so when pixel p is reached, everything it needs is already cached. Only layers
    with a spatial kernel need a cache of their input (zero-padded so border pixels need
    no special case); 1x1 layers work on the current pixel's vector alone.

    Protocol shared with every model of the project (see `pixelcnn.sampling`):
      logits(i, j, c) -> (B, levels)   channel c of pixel (i, j); all pixels before (i, j) and
                                       channels < c of (i, j) must have been set
      set_pixel(i, j, values, c)       (B,) integer levels of channel c of pixel (i, j)
    In colour, `logits` recomputes pixel (i, j)'s activations for each channel (they see the
    channels set so far); no activation depends on the last channel, so the caches end exact.
    """

    def __init__(self, net: PixelCNN, batch_size: int, height: int, width: int, labels: Tensor | None):
        self.net = net

        def padded(conv: MaskedConv2d) -> Tensor:  # (B, H+2p, W+2p, Cin) channels-last input cache
            p = conv.kernel_size[0] // 2
            return conv.weight.new_zeros(batch_size, height + 2 * p, width + 2 * p, conv.in_channels)  # its dtype

        self.image = padded(net.input_conv)
        self.image_taps = net.input_conv.pixel_taps()
        self.block_inputs = [padded(b.masked) for b in net.blocks]
        self.block_taps = [b.masked.pixel_taps() for b in net.blocks]
        self.labels = labels

    @torch.no_grad()
    def logits(self, i: int, j: int, channel: int = 0) -> Tensor:  # -> (B, L)
        net, labels = self.net, self.labels
        h = F.relu(net.input_conv.at_pixel(self.image, self.image_taps, i, j) + net.cond_input(labels))  # (B, F)
        for block, cache, taps in zip(net.blocks, self.block_inputs, self.block_taps):
            p = block.masked.kernel_size[0] // 2
            cache[:, i + p, j + p] = F.relu(conv1x1_at(block.reduce, h) + block.cond_reduce(labels))  # (B, F/2)
            t = F.relu(block.masked.at_pixel(cache, taps, i, j) + block.cond_masked(labels))  # (B, F/2)
            h = h + F.relu(conv1x1_at(block.expand, t) + block.cond_expand(labels))  # (B, F)
        for conv, cond in zip(net.head, net.cond_head):
            h = F.relu(conv1x1_at(conv, h) + cond(labels))
        return conv1x1_at(net.to_logits, h)[:, channel * net.levels : (channel + 1) * net.levels]  # (B, C*L) -> (B, L)

    def set_pixel(self, i: int, j: int, values: Tensor, channel: int = 0) -> None:
        p = self.net.input_conv.kernel_size[0] // 2
        self.image[:, i + p, j + p, channel] = values.to(self.image.dtype) / self.net.levels
