"""``stoprt stream``: run a model on a live or recorded event stream, predicting and learning in place.

Sources (``--source``):

* a recording: any file :mod:`stoprt.runtime.formats` reads (``.bin``, ``.aedat``, ``.aedat4``,
  ``.raw``, ``.dat``); ``--realtime`` paces it by its timestamps;
* ``udp://HOST:PORT?format=spif|stoprt&width=W&height=H[&timeout=S]``: events over UDP (see
  :mod:`stoprt.runtime.stream.udp` for the packet formats); the stream ends after ``timeout``
  seconds without data;
* ``dv://`` (iniVation cameras via dv-processing) and ``nd://`` (Prophesee / iniVation via
  neuromorphic-drivers), optional extras;
* ``builtin:digits`` / ``builtin:gestures``: emulated recordings back to back, with labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import psutil


def open_source(spec: str, packet_us: int, realtime: bool, seed: int = 0):
    """The event source for a ``--source`` string (see the module docstring)."""
    if spec.startswith("builtin:"):
        from .stream.builtin import BuiltinStream
        name, _, count = spec[len("builtin:"):].partition(":")
        return BuiltinStream(name, n_samples=int(count or 200), packet_us=packet_us, seed=seed)
    url = urlparse(spec)
    if url.scheme == "udp":
        from .stream.udp import DEFAULT_PORT, UDPSource
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        size = (int(q["width"]), int(q["height"])) if "width" in q and "height" in q else None
        timeout = float(q["timeout"]) if "timeout" in q else None
        return UDPSource(url.hostname or "127.0.0.1", url.port or DEFAULT_PORT, format=q.get("format", "spif"),
                         sensor_size=size, timeout_s=timeout)
    if url.scheme in ("dv", "nd"):
        from .stream import cameras
        return cameras.DVProcessingSource() if url.scheme == "dv" else cameras.NeuromorphicDriversSource()
    from .stream.sources import FileSource
    if not Path(spec).is_file():
        raise ValueError(f"no such recording: {spec} (or use udp://, dv://, nd://, builtin:digits)")
    return FileSource(spec, packet_us=packet_us, realtime=realtime)


def load_model(spec: str, in_channels: int, size: int, classes: int, device: str):
    """``(net, meta)`` from a built-in model name, a training/session checkpoint, or a model file."""
    from . import models
    if spec in models.MODELS:
        kwargs = {"in_channels": in_channels, "size": size, "classes": classes}
        return models.build_model(spec, **kwargs).to(device), {"model": {"name": spec, "kwargs": kwargs}}
    if not Path(spec).exists():
        raise ValueError(f"--model {spec!r} is neither a built-in model ({', '.join(models.MODELS)}) nor a file")
    try:
        from ..export.model_file import load_any
    except ImportError:
        load_any = None
    if load_any is not None:
        net, input_spec = load_any(spec)
        return net.to(device), {"input_spec": input_spec, "source_model": str(spec)}
    from .checkpoint import load_checkpoint
    data = load_checkpoint(spec)
    described = data.get("model") or data.get("meta", {}).get("model")
    if not described:
        raise ValueError(f"{spec} holds no model description")
    net = models.build_model(described["name"], **described["kwargs"])
    net.load_state_dict(data["model_state"])
    return net.to(device), {"model": described}


def _backend_runner(args: argparse.Namespace):
    """An ONNX Runtime or TensorRT step runner for ``--model``, a bundle with a step graph."""
    from ..export.bundle import load_bundle
    bundle = load_bundle(args.model)
    if bundle.onnx_path is None:
        raise ValueError(f"{args.model} has no ONNX step graph: export it with `stoprt export ... --to bundle`")
    if args.backend == "onnxruntime":
        from ..export.ort_runner import OrtStepRunner
        return OrtStepRunner(bundle.onnx_path)
    from ..export.tensorrt import TrtStepRunner, build_engine
    engine = Path(args.checkpoint or bundle.root) / "step.engine"
    if not engine.exists():
        build_engine(bundle.onnx_path, engine)
    return TrtStepRunner(engine)


def _status(session, pipeline, start: float, rss0: float) -> str:
    s = session.stats
    elapsed = max(time.perf_counter() - start, 1e-9)
    p = pipeline.stats
    acc = "n/a" if s.accuracy is None else f"{100 * s.accuracy:.1f}%"
    return (f"steps {s.steps} | {s.steps / elapsed:.0f} steps/s | real-time x{p.get('realtime_factor', 0.0):.2f} | "
            f"drops {p.get('steps_dropped', 0)} | acc {acc} ({s.labelled_samples} labelled) | updates {s.updates} | "
            f"RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB (+{psutil.Process().memory_info().rss / 2**20 - rss0:.0f})")


def run_stream(args: argparse.Namespace) -> int:
    import torch

    from .session import LabelTrack, StreamSession
    from .stop import STOP
    from .stream.binning import Binner
    from .stream.pipeline import StreamPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    source = open_source(args.source, args.packet_us, args.realtime, args.seed)
    labels = LabelTrack.from_csv(args.labels) if args.labels else getattr(source, "labels", None)
    classes = args.classes or getattr(source, "num_classes", 10)
    net, meta = load_model(args.model, 2, args.size, classes, args.device)
    input_shape = tuple(getattr(net, "input_shape", None) or (2, args.size, args.size))
    sensor = source.sensor_size or (args.sensor_width, args.sensor_height)
    if sensor[0] is None:
        raise ValueError("the source does not state its sensor size: pass --sensor-width and --sensor-height")
    by_count = {"mode": "count", "events_per_step": args.events_per_step} if args.events_per_step else {}
    binner = Binner(sensor, out_size=(input_shape[-1], input_shape[-2]), dt_us=args.dt_us,
                    device=args.device, **by_count)
    learner = runner = None
    if args.backend != "torch":
        if args.learn:
            raise ValueError(f"--learn runs in torch; --backend {args.backend} is for inference "
                             "(for a frozen backbone with a learning head see stoprt.export.hybrid)")
        runner = _backend_runner(args)
    if args.learn:
        if labels is None:
            raise ValueError("--learn needs labels: --labels CSV, or a source that has them (builtin:...)")
        learner = STOP(net, torch.optim.Adam(net.parameters(), lr=args.lr), update="sample")
    else:
        net.eval()
    session = StreamSession(net, learner, runner=runner, window=args.window, labels=labels,
                            checkpoint_dir=args.checkpoint,
                            checkpoint_every=args.checkpoint_every, late_label_steps=args.late_label_steps,
                            meta={**meta, "input_shape": list(input_shape), "dt_us": args.dt_us,
                                  "events_per_step": args.events_per_step, "source": args.source})
    if args.resume:
        if not args.checkpoint:
            raise ValueError("--resume needs --checkpoint DIR")
        session.resume()
        print(f"stoprt stream: resumed at step {session.stats.steps}, stream time {session.stats.t_us} us",
              file=sys.stderr)
    pipeline = StreamPipeline(source, binner, max_queue_steps=args.queue, drop=args.drop)
    rss0 = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    last = [0.0]
    live = sys.stderr.isatty() and not args.quiet

    def on_step(sess) -> None:
        now = time.perf_counter()
        if not args.quiet and now - last[0] >= (0.5 if live else 10.0):
            last[0] = now
            print(("\r" if live else "") + _status(sess, pipeline, start, rss0), end="" if live else "\n",
                  file=sys.stderr, flush=True)

    try:
        with pipeline:
            stats = session.run(pipeline, max_steps=args.max_steps, on_step=on_step)
    finally:
        source.close()
    if live:
        print(file=sys.stderr)
    seconds = time.perf_counter() - start
    summary = {"source": args.source, "model": args.model, "learning": bool(args.learn),
               "steps": stats.steps, "samples": stats.samples, "labelled_samples": stats.labelled_samples,
               "accuracy": stats.accuracy, "updates": stats.updates, "interrupted": session.interrupted,
               "seconds": seconds, "steps_per_s": stats.steps / seconds if seconds > 0 else 0.0,
               "pipeline": pipeline.stats, "peak_rss_mib": psutil.Process().memory_info().rss / 2**20,
               "checkpoint": str(session.checkpoint_path) if session.checkpoint_path else None}
    print("stoprt stream: " + _status(session, pipeline, start, rss0))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 130 if session.interrupted else 0


def register(sub) -> None:
    p = sub.add_parser("stream", help="run a model on a live or recorded event stream, learning in place")
    p.add_argument("--source", required=True, help="recording path, udp://HOST:PORT, dv://, nd://, builtin:digits")
    p.add_argument("--model", default="mlp", help="built-in model name, checkpoint, model file or bundle")
    p.add_argument("--learn", action="store_true", help="STOP-WTL updates from labelled segments")
    p.add_argument("--labels", metavar="CSV", help="class,start_us,end_us segments (DVS128 Gesture style)")
    p.add_argument("--classes", type=int, default=None, help="classes of a new built-in model")
    p.add_argument("--size", type=int, default=16, help="input side of a new built-in model")
    p.add_argument("--window", type=int, default=10, help="steps per sample without labels (readout window)")
    p.add_argument("--dt-us", type=int, default=30_000, help="time step length (default 30000 us)")
    p.add_argument("--events-per-step", type=int, default=None, help="fixed event count per step instead")
    p.add_argument("--packet-us", type=int, default=None, help=argparse.SUPPRESS)  # files: 1000
    p.add_argument("--sensor-width", type=int, default=None)
    p.add_argument("--sensor-height", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--late-label-steps", type=int, default=0, help="keep this many steps to replay late labels")
    p.add_argument("--checkpoint", metavar="DIR", help="write session.pt here (atomically)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="samples between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from DIR/session.pt")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--realtime", action="store_true", help="pace a recording by its timestamps")
    p.add_argument("--queue", type=int, default=8, help="steps buffered between producer and model")
    p.add_argument("--drop", choices=("oldest", "newest"), default="oldest", help="which steps to drop when behind")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="inference backend; onnxruntime/tensorrt take a bundle from `stoprt export --to bundle`")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_stream)
