"""Streaming input: live and recorded event sources, incremental binning and the decoupled pipeline.

    from stoprt.runtime.stream import Binner, FileSource, StreamPipeline
    source = FileSource("recording.aedat", packet_us=1000)
    binner = Binner(source.sensor_size, out_size=32, dt_us=10_000, denoise_us=5000)
    with StreamPipeline(source, binner, max_queue_steps=8) as pipe:
        for step in pipe:            # Step: frame [2, 32, 32], t_start, t_end, n_events, index
            ...

Sources (:mod:`.sources`, :mod:`.udp`, :mod:`.cameras`) yield EVENT_DTYPE packets; :class:`Binner`
(:mod:`.binning`, with the event filters of :mod:`.filters`) turns packets into time steps holding
at most one partial step; :class:`StreamPipeline`
(:mod:`.pipeline`) runs source and binner in a producer thread behind a bounded queue. Image and video
input use the encodings of :mod:`.encodings` instead of a binner. Everything here but the encodings
imports without torch.
"""

from .binning import Binner, Step
from .cameras import CameraError, DVProcessingSource, MissingExtraError, NeuromorphicDriversSource
from .pipeline import StreamPipeline
from .sources import EventSource, FileSource
from .udp import UDPSender, UDPSource

_ENCODINGS = ("FrameDifference", "direct", "frame_difference", "rate")  # torch: loaded on first use


def __getattr__(name: str):
    if name not in _ENCODINGS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import encodings
    return getattr(encodings, name)


__all__ = ["Binner", "Step", "EventSource", "FileSource", "UDPSource", "UDPSender", "DVProcessingSource",
           "NeuromorphicDriversSource", "MissingExtraError", "CameraError", "StreamPipeline", "direct", "rate",
           "FrameDifference", "frame_difference"]
