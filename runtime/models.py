"""Model builders, all made of stoprt layers and trainable by STOP and BPTT alike.

Every builder takes the input channels, the input size (square side, pixels), the number of classes,
a ``width`` multiplier for the channel counts and ``readout`` (True for a non-spiking leaky readout
head instead of a LIF head). Inputs are one step ``[B, in_channels, size, size]`` (MLP: any shape, it
flattens).
"""

from __future__ import annotations

from typing import Callable

from . import layers as L

VGG11_CONFIG = (64, "A", 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "A")


def _head(in_features: int, classes: int, readout: bool) -> list:
    return [L.Linear(in_features, classes), L.LeakyReadout() if readout else L.LIF()]


def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def vgg11(in_channels: int = 3, size: int = 32, classes: int = 10, width: float = 1.0,
          readout: bool = False, threshold: str = "channel") -> L.Sequential:
    """VGG-11 in the STOP authors' CIFAR configuration.

    Eight 3x3 convolutions ``[64, A, 128, A, 256, 256, A, 512, 512, A, 512, 512, A]`` (A = 2x2 average
    pooling of spikes), each followed by BatchNorm and a LIF; global average pooling; Linear + LIF.
    Pools that would shrink a map below 1x1 are skipped, so small DVS inputs work too.
    """
    layers: list = []
    channels, side = in_channels, size
    for item in VGG11_CONFIG:
        if item == "A":
            if side >= 2:
                layers.append(L.AvgPool2d(2))
                side //= 2
            continue
        out = _ch(item, width)
        layers += [L.Conv2d(channels, out, 3, padding=1, bias=False), L.BatchNorm2d(out),
                   L.LIF(threshold=threshold)]
        channels = out
    layers += [L.AdaptiveAvgPool2d(1), L.Flatten(), *_head(channels, classes, readout)]
    return L.Sequential(*layers, input_shape=(in_channels, size, size))


def resnet18(in_channels: int = 3, size: int = 32, classes: int = 10, width: float = 1.0,
             readout: bool = False, threshold: str = "channel") -> L.Sequential:
    """Pre-activation ResNet-18: blocks ``BN-LIF-conv-BN-LIF-conv`` plus shortcut.

    The residual stream is a current read by several LIFs (every block's first LIF and the next
    stage's); those LIFs share one leak per stream segment, which keeps STOP exact with a single
    input trace per convolution (see :mod:`stoprt.runtime.wiring`). Downsampling blocks apply their
    1x1 shortcut to the pre-activated spikes, as in the original pre-activation design.
    """
    def stream_lif(leader):
        return L.LIF(threshold=threshold, share_leak_with=leader)

    c0 = _ch(64, width)
    layers: list = [L.Conv2d(in_channels, c0, 3, padding=1, bias=False)]
    leader = None
    channels = c0
    for stage, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
        out = _ch(planes, width)
        for block in range(2):
            s = stride if block == 0 else 1
            lif = stream_lif(leader)
            leader = leader or lif
            main = [L.Conv2d(channels, out, 3, stride=s, padding=1, bias=False), L.BatchNorm2d(out),
                    L.LIF(threshold=threshold), L.Conv2d(out, out, 3, padding=1, bias=False)]
            if s == 1 and channels == out:
                layers.append(L.Residual(L.Sequential(L.BatchNorm2d(channels), lif, *main)))
            else:
                shortcut = L.Conv2d(channels, out, 1, stride=s, bias=False)
                layers += [L.BatchNorm2d(channels), lif, L.Residual(L.Sequential(*main), shortcut)]
                leader = None  # the stream restarts after a downsampling block
            channels = out
    layers += [L.BatchNorm2d(channels), stream_lif(leader), L.AdaptiveAvgPool2d(1), L.Flatten(),
               *_head(channels, classes, readout)]
    return L.Sequential(*layers, input_shape=(in_channels, size, size))


def dvs_gesture_net(in_channels: int = 2, size: int = 32, classes: int = 11, width: float = 1.0,
                    readout: bool = False, threshold: str = "channel") -> L.Sequential:
    """Compact network for 2-channel event frames (DVS128 Gesture downsampled to 32 or 48 px).

    Three conv-BN-LIF-pool stages (32, 64, 128 channels at width 1), a hidden dense LIF layer with
    per-sample dropout, and the head.
    """
    layers: list = []
    channels, side = in_channels, size
    for planes in (32, 64, 128):
        out = _ch(planes, width)
        layers += [L.Conv2d(channels, out, 3, padding=1, bias=False), L.BatchNorm2d(out),
                   L.LIF(threshold=threshold), L.AvgPool2d(2)]
        channels, side = out, side // 2
    hidden = _ch(128, width)
    layers += [L.Flatten(), L.Linear(channels * side * side, hidden), L.LIF(threshold=threshold),
               L.Dropout(0.2), *_head(hidden, classes, readout)]
    return L.Sequential(*layers, input_shape=(in_channels, size, size))


def mlp(in_channels: int = 2, size: int = 32, classes: int = 10, width: float = 1.0,
        readout: bool = False, threshold: str = "channel", hidden: tuple[int, ...] = (256,)) -> L.Sequential:
    """Multi-layer perceptron of LIF layers over the flattened input ``in_channels * size * size``."""
    layers: list = [L.Flatten()]
    features = in_channels * size * size
    for h in hidden:
        out = _ch(h, width)
        layers += [L.Linear(features, out), L.LIF(threshold=threshold)]
        features = out
    layers += _head(features, classes, readout)
    return L.Sequential(*layers, input_shape=(in_channels, size, size))


MODELS: dict[str, Callable[..., L.Sequential]] = {
    "vgg11": vgg11, "resnet18": resnet18, "dvs_gesture": dvs_gesture_net, "mlp": mlp,
}


def build_model(name: str, **kwargs) -> L.Sequential:
    """Build a model by name (``vgg11``, ``resnet18``, ``dvs_gesture``, ``mlp``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
