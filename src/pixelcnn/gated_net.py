"""The Gated PixelCNN: vertical and horizontal stacks of gated convolutions, no blind spot.

The seed PixelCNN stacks masked k x k kernels, whose receptive field misses a growing
wedge of pixels up and to the right (the blind spot). The Gated PixelCNN splits every
layer into two stacks:
- the vertical stack sees whole rows above the current pixel (a (k//2+1) x k kernel whose
  bottom row is the current row; the first layer also hides the current row, so the
  vertical stack at row i depends on input rows < i only);
- the horizontal stack sees the current row up to the current pixel (a 1 x (k//2+1)
  kernel; the first layer hides the pixel itself), and receives the vertical stack at the
  same position through a 1x1 convolution.
Together the output at pixel p depends on every input pixel before p in raster order
(given enough layers) and on none at or after p. Each layer is gated,
tanh(a) * sigmoid(b), and the horizontal stack is residual with a 1x1 convolution on its
branch. Class conditioning adds a learned per-class bias to a and b (the paper's V^T h with
a one-hot h).

Colour (`image_channels` = 3, the paper's section 2.1): only the horizontal stack sees the current
pixel, so only it is masked over colour groups (`pixelcnn.pixelcnn_net.colour_mask`): its kernel's last
column (the current pixel) and its 1x1 convs. The two halves of a gated conv's output (value and
gate) carry the same groups, so the gate keeps them apart. The vertical stack sees rows above only.

References:
- van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves, Kavukcuoglu 2016, "Conditional
  Image Generation with PixelCNN Decoders" (gated units, the two stacks, conditioning).
- UvA deep learning tutorial 12, "Autoregressive Image Modeling" (class layout:
  VerticalStackConv, HorizontalStackConv, GatedMaskedConv).
- Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models"
  (see `GatedPixelCNN.start_incremental`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixelcnn.pixelcnn_net import (INPUT_KERNEL_MIN, ClassBias, MaskedConv2d, channel_groups, channel_mask, conv1x1_at,
                            odd_kernel, spatial)


def gate(x: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b) with a, b the two halves of the channels. (B, 2C, ...) -> (B, C, ...)"""
    value, gate_ = x.chunk(2, dim=1)
    return torch.tanh(value) * torch.sigmoid(gate_)


class VerticalStackConv(nn.Conv2d):
    """A (k//2+1) x k kernel over the rows above and the current row (bottom kernel row).

    The input is zero-padded above and on both sides only, so output row i reads input rows
    i - (k//2)*dilation .. i. With `mask_center` the bottom kernel row is masked (in
    `forward`), so output row i sees only the rows above.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 mask_center: bool = False):
        super().__init__(in_channels, out_channels, (kernel_size // 2 + 1, kernel_size), dilation=dilation)
        self.pad_top = self.pad_side = (kernel_size // 2) * dilation
        mask = torch.ones(kernel_size // 2 + 1, kernel_size)
        if mask_center:
            mask[-1] = 0
        self.register_buffer("mask", mask[None, None], persistent=False)

    def pad(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H + top, W + 2 side)
        return F.pad(x, (self.pad_side, self.pad_side, self.pad_top, 0))

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        return F.conv2d(self.pad(x), self.weight * self.mask, self.bias, dilation=self.dilation)

    def row(self, padded: Tensor, i: int) -> Tensor:
        """Output row i alone, from the input padded as by `pad`. (B, Cin, H+top, W+2side) -> (B, Cout, 1, W)"""
        return F.conv2d(padded[:, :, i : i + self.pad_top + 1], self.weight * self.mask, self.bias,
                        dilation=self.dilation)


class HorizontalStackConv(nn.Conv2d):
    """A 1 x (k//2+1) kernel over the pixels left of and at the current one (last kernel column).

    The input is zero-padded on the left only. The last kernel column (the current pixel) is
    masked over colour groups (in `forward`; `channel_mask`, type A with `mask_center`, else B);
    the output's groups repeat in each half (value, gate) of `halves`. With one colour that is the
    whole column with `mask_center` (the output at (i, j) sees only pixels left of j in row i), else
    none of it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 mask_center: bool = False, colours: int = 1, halves: int = 1):
        super().__init__(in_channels, out_channels, (1, kernel_size // 2 + 1), dilation=(1, dilation))
        self.pad_left = (kernel_size // 2) * dilation
        out_groups = channel_groups(out_channels // halves, colours).repeat(halves)
        mask = torch.ones(out_channels, in_channels, 1, kernel_size // 2 + 1)
        mask[:, :, 0, -1] = channel_mask(out_groups, channel_groups(in_channels, colours), "A" if mask_center else "B")
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        return F.conv2d(F.pad(x, (self.pad_left, 0)), self.weight * self.mask, self.bias, dilation=self.dilation)

    def at_pixel(self, padded_row: Tensor, j: int) -> Tensor:
        """Output at column j of one row, from that row padded by at least `pad_left` on the left
        (exactly pad_left before column 0). (B, Cin, >= W+left) -> (B, Cout)"""
        patch = padded_row[:, :, j : j + self.pad_left + 1 : self.dilation[1]]  # (B, Cin, k//2+1)
        weight = (self.weight * self.mask).flatten(1)  # (Cout, Cin*(k//2+1)), same (Cin, tap) order
        return torch.addmm(self.bias, patch.reshape(patch.shape[0], -1), weight.t())


class GatedMaskedConv(nn.Module):
    """One gated layer of both stacks (the paper's figure 2).

    vertical:   v_feat = V * v;                v_out = gate(v_feat + class bias)
    horizontal: h_feat = H * h + 1x1(v_feat) + class bias;  h_out = h + 1x1(gate(h_feat))
    Dropout acts on both gated outputs during training.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int = 1, dropout: float = 0.0,
                 num_classes: int = 0, colours: int = 1):
        super().__init__()
        self.vertical = VerticalStackConv(channels, 2 * channels, kernel_size, dilation)
        self.horizontal = HorizontalStackConv(channels, 2 * channels, kernel_size, dilation, colours=colours, halves=2)
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)  # `horizontal` has the bias
        self.horizontal_out = MaskedConv2d(channels, channels, 1, "B", colours)  # grey: a plain 1x1 conv
        self.dropout = nn.Dropout(dropout)
        self.cond_vertical = ClassBias(num_classes, 2 * channels)
        self.cond_horizontal = ClassBias(num_classes, 2 * channels)

    def forward(self, v: Tensor, h: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        v_feat = self.vertical(v)  # (B, 2C, H, W)
        h_feat = self.horizontal(h) + self.vertical_to_horizontal(v_feat) + spatial(self.cond_horizontal(labels))
        v_out = self.dropout(gate(v_feat + spatial(self.cond_vertical(labels))))  # (B, C, H, W)
        h_out = h + self.horizontal_out(self.dropout(gate(h_feat)))  # (B, C, H, W)
        return v_out, h_out

    def vertical_row(self, padded_v: Tensor, i: int, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """Row i of the vertical stack (eval mode): its output (B, C, 1, W) and the 1x1 link into
        the horizontal stack (B, 2C, 1, W). `padded_v` is this layer's input padded by `vertical.pad`."""
        v_feat = self.vertical.row(padded_v, i)  # (B, 2C, 1, W)
        return gate(v_feat + spatial(self.cond_vertical(labels))), self.vertical_to_horizontal(v_feat)

    def horizontal_at(self, padded_row: Tensor, j: int, link: Tensor, labels: Tensor | None) -> Tensor:
        """Horizontal output at column j (eval mode), from this layer's input row padded by
        `horizontal.pad_left` and the vertical link at (i, j). -> (B, C)"""
        h = padded_row[:, :, j + self.horizontal.pad_left]  # (B, C)
        h_feat = self.horizontal.at_pixel(padded_row, j) + link + self.cond_horizontal(labels)  # (B, 2C)
        return h + conv1x1_at(self.horizontal_out, gate(h_feat))


class GatedPixelCNN(nn.Module):
    """Input convs (hiding the current pixel) -> `layers` gated layers -> a head to logits.

    Input: pixel levels scaled to [0, 1) as `level / levels`, shape (B, C, H, W), C = `image_channels`;
    with `centre_input` the network first maps them to [-1, 1] (level 0 -> -1, the last -> 1).
    Output: logits over the `levels` levels of every pixel and channel, shape (B, C * levels, H, W)
    (channel c's logits are [c * levels, (c + 1) * levels)). `dilations` is cycled over the layers, e.g.
    (1, 2, 1, 4). `head` "relu": ReLU, 1x1, ReLU, 1x1 (the first ReLU drops the residual stream's
    negative half); "elu": ELU and one 1x1. The defaults here are the first design's, which a checkpoint
    without an option was trained with; conf/model/gated.yaml holds the ones to train with (docs/gated_ablation.md).
    """

    def __init__(
        self,
        levels: int = 4,
        channels: int = 128,
        layers: int = 8,
        kernel_size: int = 3,
        input_kernel: int = 7,
        dilations: Sequence[int] = (1,),
        dropout: float = 0.0,
        num_classes: int = 0,
        image_channels: int = 1,
        centre_input: bool = False,
        head: str = "relu",
    ):
        super().__init__()
        dilations = tuple(dilations)  # Hydra passes a ListConfig
        if head not in ("relu", "elu"):
            raise ValueError(f"head must be relu or elu, got {head!r}")
        if not odd_kernel(kernel_size):
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if not odd_kernel(input_kernel, INPUT_KERNEL_MIN):
            raise ValueError(f"input_kernel must be odd and >= {INPUT_KERNEL_MIN}, got {input_kernel}")
        if channels < image_channels:
            raise ValueError(f"channels must be >= {image_channels} for {image_channels} colour groups, got {channels}")
        self.levels, self.image_channels = levels, image_channels
        self.num_classes, self.centre_input, self.head_kind = num_classes, centre_input, head
        colours = image_channels
        self.input_vertical = VerticalStackConv(colours, channels, input_kernel, mask_center=True)
        self.input_horizontal = HorizontalStackConv(colours, channels, input_kernel, mask_center=True, colours=colours)
        self.cond_input_vertical = ClassBias(num_classes, channels)
        self.cond_input_horizontal = ClassBias(num_classes, channels)
        self.gated_layers = nn.ModuleList(
            GatedMaskedConv(channels, kernel_size, dilations[n % len(dilations)], dropout, num_classes, colours)
            for n in range(layers)
        )
        if head == "relu":
            self.head = MaskedConv2d(channels, channels, 1, "B", colours)  # grey: plain 1x1 convs
            self.cond_head = ClassBias(num_classes, channels)
        self.to_logits = MaskedConv2d(channels, colours * levels, 1, "B", colours)

    def scale(self, x: Tensor) -> Tensor:
        """The network's own input scale: `level / levels`, or [-1, 1] with `centre_input`. (any shape)"""
        # Centred: 0.025 bits/dim lower at the CPU preset after 2 epochs (docs/gated_ablation.md).
        return x * (2 * self.levels / (self.levels - 1)) - 1 if self.centre_input else x

    def output(self, h: Tensor, labels: Tensor | None, conv1x1=lambda conv, x: conv(x), bias=spatial) -> Tensor:
        """The head on the last horizontal stream: (B, C, H, W) -> (B, C*L, H, W), or at one pixel (B, C) ->
        (B, C*L) with `conv1x1=conv1x1_at` and `bias` the identity (the incremental sampler's)."""
        if self.head_kind == "elu":  # keeps the stream's negative half: 0.005 bits/dim lower (docs/gated_ablation.md)
            return conv1x1(self.to_logits, F.elu(h))
        h = F.relu(conv1x1(self.head, F.relu(h)) + bias(self.cond_head(labels)))
        return conv1x1(self.to_logits, h)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # (B, C, H, W) -> (B, C*L, H, W)
        x = self.scale(x)
        v = self.input_vertical(x) + spatial(self.cond_input_vertical(labels))  # (B, C, H, W): rows above
        h = self.input_horizontal(x) + spatial(self.cond_input_horizontal(labels))  # (B, C, H, W): pixels left
        for layer in self.gated_layers:
            v, h = layer(v, h, labels)
        return self.output(h, labels)

    def start_incremental(self, batch_size: int, height: int, width: int,
                          labels: Tensor | None = None) -> IncrementalGatedPixelCNN:
        return IncrementalGatedPixelCNN(self, batch_size, height, width, labels)


class IncrementalGatedPixelCNN:
    """Sampling state of a `GatedPixelCNN` that computes every activation exactly once.

    The vertical stack at row i depends only on input rows < i, so `logits(i, 0)` computes
    row i of every vertical layer at once (before any pixel of row i is set); the horizontal
    stack then advances one pixel per call. Caches hold each spatial conv's input,
    zero-padded so border pixels need no special case. Dropout is the identity here (eval
    mode). All buffers are allocated up front and every step has fixed shapes.

    Protocol shared with every model of the project (see `pixelcnn.sampling`):
      logits(i, j, c) -> (B, levels)   channel c of pixel (i, j); all pixels before (i, j) and
                                       channels < c of (i, j) must have been set
      set_pixel(i, j, values, c)       (B,) integer levels of channel c of pixel (i, j)
    As for `IncrementalPixelCNN`, `logits` must be called at every pixel in raster order
    (it is what fills the caches).
    """

    def __init__(self, net: GatedPixelCNN, batch_size: int, height: int, width: int, labels: Tensor | None):
        self.net = net
        self.labels = labels
        zeros = net.to_logits.weight.new_zeros  # on the weights' device, of their dtype
        p = net.input_vertical.pad_side  # == pad_top == input_horizontal.pad_left
        self.image = zeros(batch_size, net.image_channels, height + p, width + 2 * p)  # padded model input
        self.vertical_inputs = [
            zeros(batch_size, layer.vertical.in_channels, height + layer.vertical.pad_top,
                  width + 2 * layer.vertical.pad_side)
            for layer in net.gated_layers
        ]  # padded input of each layer's vertical conv, all rows
        self.horizontal_inputs = [
            zeros(batch_size, layer.horizontal.in_channels, width + layer.horizontal.pad_left)
            for layer in net.gated_layers
        ]  # padded input of each layer's horizontal conv, current row only: columns < j are this row's
        self.links = [
            zeros(batch_size, layer.vertical.out_channels, width) for layer in net.gated_layers
        ]  # each layer's vertical -> horizontal link along the current row

    def _vertical_row(self, i: int) -> None:
        net, labels = self.net, self.labels
        v = net.input_vertical.row(self.image, i) + spatial(net.cond_input_vertical(labels))  # (B, C, 1, W)
        for layer, cache, link in zip(net.gated_layers, self.vertical_inputs, self.links):
            top, side = layer.vertical.pad_top, layer.vertical.pad_side
            cache[:, :, i + top : i + top + 1, side : cache.shape[-1] - side] = v
            v, row_link = layer.vertical_row(cache, i, labels)  # (B, C, 1, W), (B, 2C, 1, W)
            link.copy_(row_link[:, :, 0])

    @torch.no_grad()
    def logits(self, i: int, j: int, channel: int = 0) -> Tensor:  # -> (B, L)
        net, labels = self.net, self.labels
        if j == 0 and channel == 0:  # row i of the vertical stack needs only rows < i, all set by now
            self._vertical_row(i)
        p = net.input_horizontal.pad_left
        h = net.input_horizontal.at_pixel(self.image[:, :, i + p], j) + net.cond_input_horizontal(labels)  # (B, C)
        for layer, row, link in zip(net.gated_layers, self.horizontal_inputs, self.links):
            row[:, :, j + layer.horizontal.pad_left] = h
            h = layer.horizontal_at(row, j, link[:, :, j], labels)  # (B, C)
        # (B, C*L) -> (B, C, L) -> (B, L): channel c's logits
        return net.output(h, labels, conv1x1_at, bias=lambda b: b).unflatten(1, (-1, net.levels))[:, channel]

    def set_pixel(self, i: int, j: int, values: Tensor, channel: int = 0) -> None:
        p = self.net.input_vertical.pad_side
        self.image[:, channel, i + p, j + p] = self.net.scale(values.to(self.image.dtype) / self.net.levels)
