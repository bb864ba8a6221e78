"""``stoprt stream``: run a model on a live or recorded event stream, predicting and learning in place.

Sources (``--source``):

* a recording: any file :mod:`stoprt.runtime.formats` reads (``.bin``, ``.aedat``, ``.aedat4``,
  ``.raw``, ``.dat``; ``--format`` names the reader instead of the extension and header); ``--realtime``
  paces it by its timestamps. A file cut short or with most of its events dropped streams what it has
  with a warning on stderr (also in ``--json``'s ``warnings``); a file with no readable event is an
  error (exit code 2);
* ``udp://HOST:PORT?format=spif|stoprt&width=W&height=H[&timeout=S]``: events over UDP (see
  :mod:`stoprt.runtime.stream.udp` for the packet formats); the stream ends after ``timeout``
  seconds without data;
* ``dv://`` (iniVation cameras via dv-processing) and ``nd://`` (Prophesee / iniVation via
  neuromorphic-drivers), optional extras;
* ``builtin:digits`` / ``builtin:gestures``: emulated recordings back to back, with labels.

Learning (``--learn``) runs STOP in torch, or from a learning bundle (``stoprt export CKPT --to
onnx-learn``): with ``--backend onnxruntime`` in ONNX Runtime, importing no torch (the edge install;
:class:`~stoprt.export.ort_learner.OrtLearner`, ``--provider`` asks for an execution provider), with
``--backend tensorrt`` in TensorRT engines built from the bundle's graphs and cached next to the
bundle (:class:`~stoprt.export.trt_learner.TrtLearner`; a CUDA GPU, ``--device
cuda:N`` picks one). Both take numpy frames from the binner and checkpoint ``session.npz``.

Each closed readout window prints its predicted class and time on stdout (unless ``--quiet``);
``--predictions FILE.csv|FILE.jsonl`` also writes them, a row per window (see
:mod:`stoprt.runtime.stream.predictions`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import psutil

from ..cli_args import nonnegative_int, positive_float, positive_int, torch_device, update_schedule, warn
from ..runtime.usage import seconds_since_process_start


def open_source(spec: str, packet_us: int, realtime: bool, seed: int = 0, format: str | None = None,
                sensor_size: tuple[int, int] | None = None, start_us: int | None = None):
    """The event source for a ``--source`` string (see the module docstring); ``format`` and
    ``sensor_size`` apply to recordings. ``start_us``: where a resumed session continues; recordings
    and built-in streams start there (live sources are live)."""
    if format is not None and (spec.startswith("builtin:") or "://" in spec):
        raise ValueError("--format applies to recordings (a udp:// source takes ?format=spif|stoprt)")
    if spec.startswith("builtin:"):
        from ..runtime.stream.builtin import BuiltinStream
        name, _, count = spec[len("builtin:"):].partition(":")
        return BuiltinStream(name, n_samples=int(count or 200), packet_us=packet_us, seed=seed,
                             start_us=start_us or 0)
    url = urlparse(spec)
    if url.scheme == "udp":
        from ..runtime.stream.udp import DEFAULT_PORT, UDPSource
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        size = (int(q["width"]), int(q["height"])) if "width" in q and "height" in q else None
        timeout = float(q["timeout"]) if "timeout" in q else None
        return UDPSource(url.hostname or "127.0.0.1", url.port or DEFAULT_PORT, format=q.get("format", "spif"),
                         sensor_size=size, timeout_s=timeout)
    if url.scheme in ("dv", "nd"):
        from ..runtime.stream import cameras
        return cameras.DVProcessingSource() if url.scheme == "dv" else cameras.NeuromorphicDriversSource()
    from ..runtime.stream.sources import FileSource
    if not Path(spec).is_file():
        raise ValueError(f"no such recording: {spec} (or use udp://, dv://, nd://, builtin:digits)")
    return FileSource(spec, packet_us=packet_us, realtime=realtime, format=format, sensor_size=sensor_size,
                      start_us=start_us)


def load_model(spec: str, in_channels: int, size: int, classes: int, device: str):
    """``(net, meta)`` from a built-in model name, a training/session checkpoint, a model file or a
    bundle; ``meta`` records how to build the network again, so that the session's own session.pt
    loads the same way."""
    from ..export.loading import load_network
    loaded = load_network(spec, {"in_channels": in_channels, "size": size, "classes": classes})
    if loaded.path is None:
        return loaded.net.to(device), {"model": loaded.model}
    from ..export.architecture import describe
    return loaded.net.to(device), {"model": {"architecture": describe(loaded.net)}, "input_spec": loaded.input_spec,
                                   "source_model": str(spec)}


# What a session's steps depend on: a resume with other values is refused (or forced with --force).
_SETTINGS = ("source", "format", "model", "learn", "labels", "classes", "size", "window", "dt_us", "events_per_step",
             "sensor_width", "sensor_height", "lr", "late_label_steps", "seed", "update")
_ADDED = {"update": "sample"}  # settings newer than some checkpoints: what those were written with


def _check_resume(data: dict, args: argparse.Namespace, path: Path) -> None:
    """Refuse to resume a session checkpoint written for another source or other settings."""
    if data.get("kind") != "stream-session":
        raise ValueError(f"{path} is not a stream-session checkpoint")
    saved = (data.get("meta") or {}).get("settings")
    if args.force:
        return
    if saved is None:
        raise ValueError(f"{path} does not record its source and settings (written by an older stoprt); "
                         "pass --force to resume it anyway")
    now = {k: getattr(args, k) for k in _SETTINGS}
    changed = [f"--{k.replace('_', '-')} {saved.get(k, _ADDED.get(k))!r} (now {now[k]!r})"
               for k in _SETTINGS if saved.get(k, _ADDED.get(k)) != now[k]]
    if changed:
        raise ValueError(f"{path} was written with other settings: {', '.join(changed)}; resume with the same "
                         "ones, or pass --force")


def _status(session, pipeline, start: float, rss0: float, steps0: int = 0) -> str:
    """``steps0``: steps done before this process (a resume); rates count this process's steps only."""
    s = session.stats
    elapsed = max(time.perf_counter() - start, 1e-9)
    p = pipeline.stats
    acc = "n/a" if s.accuracy is None else f"{100 * s.accuracy:.1f}%"
    return (f"steps {s.steps} | {(s.steps - steps0) / elapsed:.0f} steps/s | real-time x{p.get('realtime_factor', 0.0):.2f} | "
            f"drops {p.get('steps_dropped', 0)} | acc {acc} ({s.labelled_samples} labelled) | updates {s.updates} | "
            f"RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB (+{psutil.Process().memory_info().rss / 2**20 - rss0:.0f})")


def _warn_if_labels_unused(args: argparse.Namespace, labels, stats) -> None:
    """One warning line when labels were given but no step fell inside any of them (times relative to
    the recording's start instead of its timestamps, say): learning did nothing, accuracy is n/a."""
    if labels is None or stats.labelled_samples or not stats.steps or not labels.segments:
        return
    first, last = labels.segments[0].start_us, max(s.end_us for s in labels.segments)
    warn("stream", f"{'--learn made no update: ' if args.learn else ''}no step fell inside any of the "
                   f"{len(labels.segments)} label segments ({first}..{last} us); label times are the stream's "
                   f"own timestamps in microseconds, and its last step ended at {stats.t_us} us")


def _check_backend_options(args: argparse.Namespace) -> bool:
    """Whether this run learns from a learning bundle (ONNX Runtime, torch-free, or TensorRT) rather
    than in torch; refuses options that do not apply."""
    bundle_learn = args.learn and args.backend in ("onnxruntime", "tensorrt")
    ort_learn = bundle_learn and args.backend == "onnxruntime"
    if not ort_learn and (args.provider is not None or args.strict):
        raise ValueError("--provider and --strict apply to --backend onnxruntime --learn")
    if args.compile != "auto" and (not args.learn or bundle_learn):
        raise ValueError("--compile applies to torch's STOP learner: --learn with --backend torch")
    if ort_learn and args.device != "cpu":
        raise ValueError("--device is torch's; ONNX Runtime learning takes --provider cpu|cuda|tensorrt")
    if not bundle_learn:  # torch's defaults; the bundle's learners take the bundle's
        args.lr = 1e-3 if args.lr is None else args.lr
        args.update = "sample" if args.update is None else args.update
    return bundle_learn


def _bundle_learner(args: argparse.Namespace):
    """``(learner, meta)`` from a learning bundle, checked (see GraphLearner.from_bundle): ONNX Runtime's
    or TensorRT's, whose engines are cached next to the bundle."""
    if args.backend == "tensorrt":
        from ..export.trt_learner import TrtLearner
        device = args.device if args.device.startswith("cuda") else "cuda"  # TensorRT runs on a GPU
        learner = TrtLearner.from_bundle(args.model, lr=args.lr, update=args.update, device=device)
    else:
        from ..export.ort_learner import OrtLearner
        learner = OrtLearner.from_bundle(args.model, lr=args.lr, update=args.update, threads=args.threads or 1,
                                         provider=args.provider or "cpu", strict=args.strict)
    meta = {"model": {"bundle": str(args.model)}, "input_spec": learner.manifest.get("input_spec"),
            "source_model": str(args.model)}
    return learner, meta


def run_stream(args: argparse.Namespace) -> int:
    from ..runtime.atomic import remove_stale_temporaries, write_text
    from ..runtime.checkpoint import load_array_checkpoint, load_checkpoint
    from ..runtime.stream.binning import Binner
    from ..runtime.stream.pipeline import StreamPipeline
    from ..runtime.stream.predictions import PredictionLog, check_path, describe
    from ..runtime.stream.labels import LabelTrack
    from ..runtime.stream.session import StreamSession
    from ..runtime.usage import peak_rss_mib

    bundle_learn = _check_backend_options(args)
    if not bundle_learn:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
    if args.backend == "tensorrt":
        from ..export.tensorrt import import_tensorrt
        import_tensorrt()  # a missing TensorRT fails first, in one line, before anything is loaded
    saved = None
    checkpoint = StreamSession.checkpoint_file(args.checkpoint, arrays=bundle_learn) if args.checkpoint else None
    if checkpoint:
        remove_stale_temporaries(checkpoint)  # of killed earlier runs
    if args.resume:
        if not args.checkpoint:
            raise ValueError("--resume needs --checkpoint DIR")
        saved = load_array_checkpoint(checkpoint) if bundle_learn else load_checkpoint(checkpoint)
        _check_resume(saved, args, checkpoint)
    if args.predictions:
        check_path(args.predictions)
    if (args.sensor_width is None) != (args.sensor_height is None):
        raise ValueError("pass both --sensor-width and --sensor-height, or neither")
    given_sensor = (args.sensor_width, args.sensor_height) if args.sensor_width is not None else None
    # A resume continues at the stream time of its checkpoint (a sample boundary): the source starts
    # there, and the time grid of the steps is the one of the interrupted run. (By event count, events
    # sharing the timestamp of the checkpoint's last step but left out of it would be skipped.)
    start_us = saved["session"]["t_us"] if saved and saved["session"]["t_us"] >= 0 else None
    source = open_source(args.source, args.packet_us, args.realtime, args.seed, args.format, given_sensor,
                         start_us=start_us)
    labels = LabelTrack.from_csv(args.labels) if args.labels else getattr(source, "labels", None)
    classes = args.classes or getattr(source, "num_classes", 10)
    learner = runner = net = None
    if bundle_learn:
        learner, meta = _bundle_learner(args)
        input_shape = tuple(learner.sig.input_shape)
    else:
        net, meta = load_model(args.model, 2, args.size, classes, args.device)
        input_shape = tuple(getattr(net, "input_shape", None) or (2, args.size, args.size))
    sensor = source.sensor_size or (args.sensor_width, args.sensor_height)
    if sensor[0] is None:
        raise ValueError("the source does not state its sensor size: pass --sensor-width and --sensor-height")
    by_count = {"mode": "count", "events_per_step": args.events_per_step} if args.events_per_step else {}
    binner = Binner(sensor, out_size=(input_shape[-1], input_shape[-2]), dt_us=args.dt_us,
                    device=args.device, t_start=None if by_count else start_us,
                    frames="numpy" if bundle_learn else "torch", **by_count)
    if args.learn and labels is None:
        raise ValueError("--learn needs labels: --labels CSV, or a source that has them (builtin:...)")
    if args.backend != "torch" and not args.learn:
        from ..export.runners import make_runner  # the step graph of a bundle; TensorRT keeps its engine
        runner = make_runner(args.backend, args.model, workdir=args.checkpoint)  # in --checkpoint DIR or the bundle
    if args.fleet and not (args.learn and args.checkpoint) or args.fleet and bundle_learn:
        raise ValueError("--fleet needs --learn and --checkpoint DIR (the agent exchanges parameters through "
                         "DIR), with torch learning (not --backend onnxruntime or tensorrt)")
    if args.learn and not bundle_learn:
        import torch

        from ..runtime.static_optim import new_optimizer  # torch.optim.Adam without the dynamo import
        from ..runtime.stop import STOP
        # fused on a CPU: one pass over the parameters per update instead of a dozen (~10x faster there);
        # capturable on a GPU: the update is replayed as a CUDA graph with the steps, instead of
        # running eagerly with two host reads at every sample's end (runtime/graphs.py)
        on_cpu = torch.device(args.device).type == "cpu"
        optimizer = new_optimizer(torch.optim.Adam, net.parameters(), lr=args.lr, fused=on_cpu, capturable=not on_cpu)
        learner = STOP(net, optimizer, update=args.update, compile=args.compile)
    elif net is not None:
        net.eval()
    live = sys.stderr.isatty() and not args.quiet
    log = PredictionLog(args.predictions)

    def on_prediction(p) -> None:
        log(p)
        if not args.quiet:
            if live:
                print("\r\033[K", end="", file=sys.stderr)  # the prediction replaces the status line
            print(describe(p), flush=True)

    merge = None
    if args.fleet:
        from ..runtime.stream.merge import FleetMerge
        merge = FleetMerge(args.checkpoint, saved)
    session = StreamSession(net, learner, runner=runner, window=args.window, labels=labels,
                            on_prediction=on_prediction,
                            on_sample_end=merge,
                            checkpoint_dir=args.checkpoint,
                            checkpoint_every=args.checkpoint_every, late_label_steps=args.late_label_steps,
                            meta={**meta, "input_shape": list(input_shape), "dt_us": args.dt_us,
                                  "events_per_step": args.events_per_step, "source": args.source,
                                  "settings": {k: getattr(args, k) for k in _SETTINGS}})
    if saved is not None:
        session.resume(data=saved)
        print(f"stoprt stream: resumed at step {session.stats.steps}, stream time {session.stats.t_us} us",
              file=sys.stderr)
    pipeline = StreamPipeline(source, binner, max_queue_steps=args.queue, drop=args.drop)
    rss0 = psutil.Process().memory_info().rss / 2**20
    start, steps0, cpu0 = time.perf_counter(), session.stats.steps, time.process_time()
    last, first = [0.0], []

    def on_step(sess) -> None:
        if not first:  # when the first step was done: the start-up a user waits for
            first.extend((seconds_since_process_start(), time.perf_counter(), sess.stats.steps))
        if args.quiet:
            return
        now = time.perf_counter()
        if now - last[0] >= (0.5 if live else 10.0):
            last[0] = now
            print(("\r" if live else "") + _status(sess, pipeline, start, rss0, steps0), end="" if live else "\n",
                  file=sys.stderr, flush=True)

    try:
        with pipeline:
            stats = session.run(pipeline, max_steps=args.max_steps, on_step=on_step)
    finally:
        source.close()
        log.close()
    if live:
        print(file=sys.stderr)
    problems = source.problems() if hasattr(source, "problems") else []
    if hasattr(source, "problems") and source.stats["events"] == 0 and not session.interrupted:
        raise ValueError(f"{args.source}: no event could be read" + (f" ({'; '.join(problems)})" if problems else
                                                                        " (empty file?)"))
    for line in problems:
        print(f"stoprt stream: warning: {line}", file=sys.stderr)
    end = time.perf_counter()
    seconds, cpu_s = end - start, time.process_time() - cpu0
    # the rate after the first step: what a stream runs at once started (under --compile fused the
    # first step compiles for seconds)
    steady = (stats.steps - first[2]) / (end - first[1]) if first and end > first[1] else None
    summary = {"source": args.source, "model": args.model, "learning": bool(args.learn),
               "steps": stats.steps, "samples": stats.samples, "labelled_samples": stats.labelled_samples,
               "accuracy": stats.accuracy, "updates": stats.updates, "interrupted": session.interrupted,
               "seconds": seconds, "steps_per_s": (stats.steps - steps0) / seconds if seconds > 0 else 0.0,
               "steady_steps_per_s": steady, "cpu_s": cpu_s, "first_step_s": first[0] if first else None,
               "learner_mode": getattr(learner, "mode", None),
               "pipeline": pipeline.stats, "peak_rss_mib": peak_rss_mib(),
               "checkpoint": str(session.checkpoint_path) if session.checkpoint_path else None,
               "warnings": problems, "predictions": log.summary()}
    print("stoprt stream: " + _status(session, pipeline, start, rss0, steps0))
    _warn_if_labels_unused(args, labels, stats)
    if args.json:
        write_text(args.json, json.dumps(summary, indent=2, default=str))
    return 130 if session.interrupted else 0


def register(sub) -> None:
    p = sub.add_parser("stream", help="run a model on a live or recorded event stream, learning in place")
    p.add_argument("--source", required=True, help="recording path, udp://HOST:PORT, dv://, nd://, builtin:digits")
    p.add_argument("--model", default="mlp", help="built-in model name, checkpoint, model file or bundle")
    p.add_argument("--learn", action="store_true", help="STOP-WTL updates from labelled segments")
    p.add_argument("--labels", metavar="CSV", help="class,start_us,end_us segments (DVS128 Gesture style)")
    p.add_argument("--classes", type=positive_int, default=None, help="classes of a new built-in model")
    p.add_argument("--size", type=positive_int, default=16, help="input side of a new built-in model")
    p.add_argument("--window", type=positive_int, default=10, help="steps per sample without labels (readout window)")
    p.add_argument("--dt-us", type=positive_int, default=30_000, help="time step length (default 30000 us)")
    p.add_argument("--events-per-step", type=positive_int, default=None, help="fixed event count per step instead")
    p.add_argument("--packet-us", type=positive_int, default=None, help=argparse.SUPPRESS)  # files: 1000
    p.add_argument("--format", default=None, help="event file reader, instead of detecting it from the "
                   "extension and header: nmnist, aedat2, aedat3, aedat4, evt2, evt3, dat")
    p.add_argument("--sensor-width", type=positive_int, default=None, help="sensor size of a recording "
                   "(overrides its header; N-MNIST .bin is 34x34)")
    p.add_argument("--sensor-height", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: 1e-3 for torch's Adam; onnxruntime/tensorrt: the bundle's)")
    p.add_argument("--update", type=update_schedule, default=None, help="update schedule: sample, step, or every K "
                   "labelled steps (default: sample; onnxruntime/tensorrt: the bundle's)")
    p.add_argument("--late-label-steps", type=nonnegative_int, default=0, help="keep this many steps to replay late labels")
    p.add_argument("--checkpoint", metavar="DIR", help="write session.pt here (atomically)")
    p.add_argument("--checkpoint-every", type=nonnegative_int, default=50,
                   help="samples between checkpoints (0: only on SIGINT/SIGTERM and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/session.pt")
    p.add_argument("--fleet", action="store_true", help="take merged fleet parameters from DIR/merge.pt at "
                   "sample boundaries (written by `stoprt fleet node`; see stoprt.runtime.stream.merge)")
    p.add_argument("--force", action="store_true", help="resume even if the source or settings differ")
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--realtime", action="store_true", help="pace a recording by its timestamps")
    p.add_argument("--queue", type=positive_int, default=8, help="steps buffered between producer and model")
    p.add_argument("--drop", choices=("oldest", "newest"), default="oldest", help="which steps to drop when behind")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="backend; onnxruntime/tensorrt take a bundle from `stoprt export --to bundle` (with "
                        "--learn: from `--to onnx-learn`)")
    p.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", default="auto",
                   help="how --learn runs STOP's steps: STOP's compile= (default auto; fused compiles them with "
                        "torch.compile at the first step, seconds to tens of seconds)")
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default=None,
                   help="onnxruntime --learn: execution provider (default cpu); missing in this ONNX Runtime: "
                        "CPU with a warning, or an error with --strict")
    p.add_argument("--strict", action="store_true", help="fail if the --provider is not available")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--predictions", metavar="FILE", help="write a row per readout window (.csv or .jsonl): "
                   "window, t_start_us, t_end_us, steps, prediction, label, score")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_stream)
