"""Encodings that turn images and video frames (not events) into per-step network input.

* :func:`direct`: the image itself at every step (the first layer integrates the analog input).
* :func:`rate`: Bernoulli spikes with probability = intensity, reproducible from a seed.
* :class:`FrameDifference` / :func:`frame_difference`: a frame-based event-camera stand-in: the
  log-intensity change since a per-pixel reference, as ON/OFF counts (channel 0 OFF, 1 ON, like the
  event frames of :class:`~.binning.Binner`). It is kept beside
  :class:`~stoprt.runtime.emulator.DVSEmulator` (which records timestamped events offline, with
  mismatch and noise) because it encodes live video on the device in torch without making events.

Images are float tensors ``[H, W]`` or ``[C, H, W]`` with intensities in [0, 1].
"""

from __future__ import annotations

import torch

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for RGB -> grey


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")


def _check_image(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {getattr(image, 'dtype', type(image))}")
    if image.ndim not in (2, 3):
        raise ValueError(f"{what} must be [H, W] or [C, H, W], got shape {tuple(image.shape)}")
    if image.numel() and (float(image.min()) < 0 or float(image.max()) > 1):
        raise ValueError(f"{what} intensities must lie in [0, 1], got [{float(image.min()):.3g}, "
                         f"{float(image.max()):.3g}]")
    return image


def direct(image: torch.Tensor, T: int) -> torch.Tensor:
    """``[T, *image.shape]``: the image at every step (an expanded view, no copy)."""
    _check_T(T)
    image = _check_image(image)
    return image.unsqueeze(0).expand(T, *image.shape)


def rate(image: torch.Tensor, T: int, seed: int | None = None, generator: torch.Generator | None = None,
         gain: float = 1.0) -> torch.Tensor:
    """``[T, *image.shape]`` of 0/1 spikes, each drawn with probability ``min(gain * intensity, 1)``.

    The same ``seed`` gives the same spikes; pass a ``generator`` instead to continue one stream.
    """
    _check_T(T)
    image = _check_image(image)
    if not gain > 0:
        raise ValueError(f"gain must be > 0, got {gain!r}")
    if generator is None:
        generator = torch.Generator(device=image.device)
        generator.manual_seed(0 if seed is None else int(seed))
    prob = (image * gain).clamp(max=1.0)
    noise = torch.rand((T, *image.shape), generator=generator, device=image.device, dtype=image.dtype)
    return (noise < prob).to(image.dtype)


def to_grey(frame: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` intensity of a ``[H, W]``, ``[1, H, W]`` or ``[3, H, W]`` (RGB) frame."""
    if frame.ndim == 2:
        return frame
    if frame.ndim == 3 and frame.shape[0] == 1:
        return frame[0]
    if frame.ndim == 3 and frame.shape[0] == 3:
        weights = torch.tensor(_LUMA, dtype=frame.dtype, device=frame.device)
        return torch.einsum("chw,c->hw", frame, weights)
    raise ValueError(f"a frame must be [H, W], [1, H, W] or [3, H, W], got shape {tuple(frame.shape)}")


class FrameDifference:
    """Stateful frame differencing for video: ``encoder(frame) -> [2, H, W]`` per new frame.

    Each pixel keeps a reference log intensity ``log(eps + I)``. When the current one differs by
    ``n`` whole thresholds, the pixel reports ``n`` ON (rise) or OFF (fall) events and moves its
    reference by ``n`` thresholds (so slow drifts still accumulate into events, as on a DVS). With
    ``counts=False`` the output is binary (at most one event per pixel and frame). The first frame
    only sets the reference and gives zeros.
    """

    def __init__(self, threshold: float = 0.15, eps: float = 1e-2, counts: bool = True) -> None:
        if not threshold > 0 or not eps > 0:
            raise ValueError(f"threshold and eps must be > 0, got {threshold!r}, {eps!r}")
        self.threshold, self.eps, self.counts = float(threshold), float(eps), bool(counts)
        self._ref: torch.Tensor | None = None

    def reset(self) -> None:
        self._ref = None

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        level = torch.log(self.eps + to_grey(_check_image(frame, "frame")))
        if self._ref is None or self._ref.shape != level.shape:
            self._ref = level.clone()
            return torch.zeros((2, *level.shape), dtype=frame.dtype, device=frame.device)
        diff = level - self._ref
        n = torch.trunc(diff / self.threshold)  # signed whole thresholds crossed
        self._ref = self._ref + n * self.threshold
        if not self.counts:
            n = n.sign()
        return torch.stack((n.clamp(max=0).neg(), n.clamp(min=0))).to(frame.dtype)


def frame_difference(video: torch.Tensor, threshold: float = 0.15, eps: float = 1e-2,
                     counts: bool = True) -> torch.Tensor:
    """``[T, 2, H, W]`` ON/OFF frames of a video ``[T, H, W]`` or ``[T, C, H, W]`` (see
    :class:`FrameDifference`; step 0 is all zeros)."""
    if not isinstance(video, torch.Tensor) or video.ndim not in (3, 4) or len(video) < 1:
        raise ValueError(f"video must be a [T, H, W] or [T, C, H, W] tensor with T >= 1, got "
                         f"{tuple(getattr(video, 'shape', ()))}")
    encoder = FrameDifference(threshold, eps, counts)
    return torch.stack([encoder(frame) for frame in video])
