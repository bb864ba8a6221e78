"""TensorRT learning (issue 13, item 2): TrtLearner and `stoprt stream --backend tensorrt --learn`.

What runs without TensorRT (here): the one-line refusal of the CLI, the bundle checks that come before
TensorRT is needed, and the pure parts of the learner: the buffer plan of the learning and update
engines (checked against the graphs' real input and output names, read by ONNX Runtime, the names
OrtLearner binds), the engine-cache key and the engine I/O check. What needs TensorRT 10 and a CUDA
GPU (a Jetson with JetPack 6.1+, or a desktop GPU with `pip install tensorrt`): parity with
OrtLearner and eager STOP, the engine cache, and a learning stream with checkpoint and resume; those
skip here, saying why.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from stoprt.cli import main
from stoprt.export.bundle import BundleError
from stoprt.export.graph_learner import SCRATCH, GraphLearner, Slot, learn_step_io, update_io
from stoprt.export.model_file import save_model
from stoprt.export.signatures import LearnSignature, UpdateSignature, read_graph_signature
from stoprt.export.tensorrt import TensorRTError
from stoprt.export.trt_learner import (TrtLearner, engine_cache_key, engine_cache_path, engine_io_problem,
                                       torch_dtype_name)
from stoprt.runtime import layers as L
from stoprt.runtime.models import build_model

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not (HAVE_TENSORRT and torch.cuda.is_available()),
                               reason="needs TensorRT 10 and a CUDA GPU (Jetson: JetPack 6.1+ with python3-libnvinfer "
                                      "and a venv with --system-site-packages; desktop: pip install tensorrt)")
CLASSES, LR, MOMENTUM, DECAY = 10, 0.05, 0.9, 1e-3  # 10: builtin:digits


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A learning bundle of a small MLP (SGD with momentum and weight decay, per-sample updates)."""
    root = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    net = build_model("mlp", size=8, classes=CLASSES, hidden=(32,))
    with torch.no_grad():
        net(torch.zeros(1, *net.input_shape))
        for m in net.modules():
            if isinstance(m, L.Linear):
                m.weight.mul_(3.0)  # spikes from the first sample on: a comparison that means something
    L.reset_state(net)
    save_model(root / "model.stoprt", net, {"dt_us": 10_000})
    assert main(["export", str(root / "model.stoprt"), "--to", "onnx-learn", str(root / "bundle"), "--lr", str(LR),
                 "--momentum", str(MOMENTUM), "--weight-decay", str(DECAY), "--no-onnx"]) == 0
    return root / "bundle"


def _signatures(bundle) -> tuple[LearnSignature, UpdateSignature]:
    return (read_graph_signature(bundle / "learn_step.onnx", LearnSignature),
            read_graph_signature(bundle / "update.onnx", UpdateSignature))


# ---- without TensorRT -------------------------------------------------------------------------------
@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed: the missing-TensorRT message cannot be checked")
def test_stream_tensorrt_learn_without_tensorrt_is_one_line(bundle, tmp_path, capsys):
    code = main(["stream", "--source", "builtin:digits:2", "--model", str(bundle), "--backend", "tensorrt", "--learn",
                 "--checkpoint", str(tmp_path / "ck"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "TensorRT is not installed" in err and "python3-libnvinfer" in err and "pip install tensorrt" in err, err
    assert not (tmp_path / "ck").exists()


def test_bundle_checks_come_before_tensorrt(bundle, tmp_path):
    """A tampered bundle is refused for what it is, with or without TensorRT; an intact one then
    needs TensorRT (here: the install hint)."""
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered, ignore=shutil.ignore_patterns("*.engine"))
    graph = bytearray((tampered / "update.onnx").read_bytes())
    graph[len(graph) // 2] ^= 0xFF
    (tampered / "update.onnx").write_bytes(bytes(graph))
    with pytest.raises(BundleError, match="update.onnx does not match its checksum"):
        TrtLearner.from_bundle(tampered)
    if not HAVE_TENSORRT:
        with pytest.raises(ImportError, match="TensorRT is not installed"):
            TrtLearner.from_bundle(bundle)
    with pytest.raises(ValueError, match="update must be"):
        TrtLearner.from_bundle(bundle, update="epoch")  # checked before TensorRT is imported


def test_learn_step_plan_binds_the_graph_names_ort_sees(bundle):
    """The plan names exactly the learning graph's inputs and outputs, in graph order (as ONNX Runtime
    reads them from the file, the names OrtLearner binds), for every combination of buffer sets."""
    ort = pytest.importorskip("onnxruntime")
    sig, _ = _signatures(bundle)
    session = ort.InferenceSession(str(bundle / "learn_step.onnx"), providers=["CPUExecutionProvider"])
    want_in = [i.name for i in session.get_inputs()]
    want_out = [o.name for o in session.get_outputs()]
    for k, g, p in itertools.product((0, 1), (0, 1, None), (0, 1)):
        inputs, outputs = learn_step_io(sig, k, g, p)
        assert [n for n, _ in inputs] == want_in and [n for n, _ in outputs] == want_out
        read, written = {s for _, s in inputs}, {s for _, s in outputs}
        assert not read & written, f"k={k} g={g}: a buffer is both read and written by one step"


def test_learn_step_plan_swaps_sets_step_after_step(bundle):
    """What a step writes is what the next step reads (state after every step, accumulators after a
    labelled one); an unlabelled step's gradients go to the scratch set, never to an accumulator."""
    sig, _ = _signatures(bundle)
    assert sig.state and sig.grads
    for k, g in itertools.product((0, 1), (0, 1)):
        _, out = learn_step_io(sig, k, g)
        nxt, _ = learn_step_io(sig, 1 - k, 1 - g)
        written = {s for _, s in out if s.group in ("state", "grads")}
        read_next = {s for _, s in nxt if s.group in ("state", "grads")}
        assert written == read_next
        _, unlabelled = learn_step_io(sig, k, None)
        assert {s.set for _, s in unlabelled if s.group == "grads"} == {SCRATCH}
        assert {s.set for _, s in unlabelled if s.group == "state"} == {1 - k}


def test_update_plan_writes_the_set_the_next_step_reads(bundle):
    ort = pytest.importorskip("onnxruntime")
    sig, usig = _signatures(bundle)
    session = ort.InferenceSession(str(bundle / "update.onnx"), providers=["CPUExecutionProvider"])
    learned = frozenset(sig.learned)
    for g, u in itertools.product((0, 1), (0, 1)):
        inputs, outputs = update_io(sig, usig, g, u)
        assert [n for n, _ in inputs] == [i.name for i in session.get_inputs()]
        assert [n for n, _ in outputs] == [o.name for o in session.get_outputs()]
        assert not {s for _, s in inputs} & {s for _, s in outputs}
        # the update reads what the learning step accumulated into and the parameters it read ...
        step_in, _ = learn_step_io(sig, 0, g, u, learned)
        assert {s for _, s in inputs if s.group in ("grads", "params")} == \
            {s for _, s in step_in if s.group == "grads" or (s.group == "params" and s.name in learned)}
        # ... and writes the parameters the steps after it read (set 1 - u)
        after, _ = learn_step_io(sig, 0, g, 1 - u, learned)
        assert {s for _, s in outputs if s.group == "params"} == \
            {s for _, s in after if s.group == "params" and s.name in learned}
        assert {s.set for _, s in outputs if s.group == "optimizer"} == ({1 - u} if usig.state else set())


def test_unlearned_parameters_have_one_buffer():
    sig = LearnSignature(input_name="x", input_shape=[3], output_name="y", output_shape=[2],
                         params=[["param.w", [2, 3]], ["param.k", [2]]], learned=["param.w"])
    for p in (0, 1):
        inputs, _ = learn_step_io(sig, 0, 0, p)
        slots = {n: s for n, s in inputs}
        assert slots["param.w"] == Slot("params", p, name="param.w") and slots["param.k"].set == 0


def test_engine_cache_key_names_what_makes_an_engine_unusable(tmp_path):
    base = dict(graph_sha256="a" * 64, tensorrt_version="10.3.0", gpu_name="Orin")
    key = engine_cache_key(**base, max_batch=16, workspace_mib=1024)
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == engine_cache_key(**base, max_batch=16, workspace_mib=1024)
    others = [engine_cache_key(**{**base, "graph_sha256": "b" * 64}, max_batch=16, workspace_mib=1024),
              engine_cache_key(**{**base, "tensorrt_version": "10.7.0"}, max_batch=16, workspace_mib=1024),
              engine_cache_key(**{**base, "gpu_name": "NVIDIA H100"}, max_batch=16, workspace_mib=1024),
              engine_cache_key(**base, max_batch=1, workspace_mib=1024),
              engine_cache_key(**base, max_batch=16, workspace_mib=256)]
    assert len({key, *others}) == 6
    path = engine_cache_path(tmp_path, tmp_path / "learn_step.onnx", key)
    assert path == tmp_path / f"learn_step.{key}.engine"


def test_engine_io_problem_names_what_differs():
    assert engine_io_problem(["x", "w"], ["y"], {"x": True, "w": True, "y": False}) is None
    assert engine_io_problem(["x", "w"], ["y"], {"x": True, "y": False}) is None  # an input TensorRT dropped
    assert "['v']" in engine_io_problem(["x", "w"], ["y"], {"x": True, "v": True, "y": False})
    assert "['y']" in engine_io_problem(["x"], ["y"], {"x": True})
    assert "['y']" in engine_io_problem(["x"], ["y"], {"x": True, "y": True})


def test_torch_dtype_of_engine_tensors():
    # TensorRT's DataType members have a ``name`` (pybind11 enums); TensorRT itself is not needed here
    assert torch_dtype_name(types.SimpleNamespace(name="INT64")) == "int64"
    assert torch_dtype_name(types.SimpleNamespace(name="BOOL")) == "bool"
    with pytest.raises(TensorRTError, match="FP8"):
        torch_dtype_name(types.SimpleNamespace(name="FP8"))


class PlanLearner(GraphLearner):
    """GraphLearner's schedule over the buffer plans that TrtLearner binds (sets of state, accumulators,
    parameters and optimizer state swapped as learn_step_io / update_io say), with the graphs run by
    plain ONNX Runtime ``session.run`` on numpy buffers: the shared logic, checked without TensorRT."""

    def __init__(self, learn_graph, update_graph, parameters, lr, update="sample"):
        import onnxruntime as ort
        self.learn = ort.InferenceSession(str(learn_graph), providers=["CPUExecutionProvider"])
        self.upd = ort.InferenceSession(str(update_graph), providers=["CPUExecutionProvider"])
        sig = read_graph_signature(learn_graph, LearnSignature)
        usig = read_graph_signature(update_graph, UpdateSignature)
        self._setup(sig, usig, lr, update, str(learn_graph))
        self.learned, self._k, self._g, self._u = frozenset(sig.learned), 0, 0, 0
        z = lambda shape: np.zeros(shape, np.float32)  # noqa: E731
        self.buf = {Slot("lr"): np.asarray(lr, np.float32), Slot("ok"): np.zeros((), bool), Slot("clamped"): z(())}
        self.buf.update({Slot("grads", s, i): z(shape) for s in range(3) for i, (_, shape) in enumerate(sig.grads)})
        self.buf.update({Slot("params", s, name=n): z(shape) for n, shape in sig.params
                         for s in ((0, 1) if n in self.learned else (0,))})
        self.buf.update({Slot("optimizer", s, name=n): z(shape) for n, shape in usig.state for s in (0, 1)})
        self.set_parameters(parameters)

    def _run(self, session, io):
        inputs, outputs = io
        values = session.run([n for n, _ in outputs], {n: self.buf[s] for n, s in inputs})
        for (_, slot), value in zip(outputs, values):
            np.copyto(self.buf[slot], value)

    def _allocate(self, batch):
        sig = self.sig
        self.buf.update({Slot("x"): np.zeros((batch, *sig.input_shape), np.float32),
                         Slot("target"): np.zeros(batch, np.int64),
                         Slot("y"): np.zeros((batch, *sig.output_shape), np.float32)})
        self.buf.update({Slot("state", s, i): np.zeros(() if shape is None else (batch, *shape), np.float32)
                         for s in (0, 1) for i, (_, shape) in enumerate(sig.state)})
        self._batch, self._k = batch, 0

    def _run_step(self, x, target, learn):
        np.copyto(self.buf[Slot("x")], x)
        if learn:
            np.copyto(self.buf[Slot("target")], target)
        self._run(self.learn, learn_step_io(self.sig, self._k, self._g if learn else None, self._u, self.learned))
        self._k ^= 1
        self._g ^= int(learn)
        return self.buf[Slot("y")].copy()

    def _run_update(self):
        self._run(self.upd, update_io(self.sig, self.usig, self._g, self._u))
        for i in range(len(self.sig.grads)):
            self.buf[Slot("grads", self._g, i)].fill(0.0)
        self._u ^= 1
        return bool(self.buf[Slot("ok")]), int(self.buf[Slot("clamped")])

    def _zero_state(self):
        for i in range(len(self.sig.state)):
            self.buf[Slot("state", self._k, i)].fill(0.0)

    def _slot(self, group, name):
        return Slot(group, 0 if group == "params" and name not in self.learned else self._u, name=name)

    def _read(self, group, name):
        return self.buf[self._slot(group, name)].copy()

    def _write(self, group, name, value):
        np.copyto(self.buf[self._slot(group, name)], value)

    def _state_arrays(self):
        return {n: self.buf[Slot("state", self._k, i)].copy() for i, (n, _) in enumerate(self.sig.state)}

    def _grad_arrays(self):
        return {n: self.buf[Slot("grads", self._g, i)].copy() for i, (n, _) in enumerate(self.sig.grads)}


@pytest.mark.parametrize("update", ["sample", "step", 3])
def test_shared_schedule_over_the_plans_matches_ort_learner(bundle, update):
    """GraphLearner (the step / end_sample / update schedule TrtLearner inherits) running the buffer
    plans TrtLearner binds, against OrtLearner: batches 1 and 3, unlabelled steps, every update
    schedule; outputs, state, accumulators, predictions and parameters identical, then a checkpoint
    round trip."""
    pytest.importorskip("onnxruntime")
    from stoprt.export.ort_learner import OrtLearner
    plan = PlanLearner.from_bundle(bundle, lr=0.01, update=update)
    ort = OrtLearner.from_bundle(bundle, lr=0.01, update=update)
    rng = np.random.default_rng(1)
    for t in range(60):
        batch = (1, 3)[(t // 10) % 2]
        x = (rng.random((batch, *plan.sig.input_shape)) < 0.3).astype(np.float32) * 2.0
        y = None if t % 7 == 3 else rng.integers(0, CLASSES, batch)
        np.testing.assert_array_equal(plan.step(x, y), ort.step(x, y), err_msg=f"step {t}")
        for what in ("state", "gradients"):
            theirs = getattr(ort, what)()
            for name, value in getattr(plan, what)().items():
                np.testing.assert_array_equal(value, theirs[name], err_msg=f"step {t}: {what} {name}")
        if t % 10 == 9:
            np.testing.assert_array_equal(plan.end_sample(), ort.end_sample())
    assert plan.updates == ort.updates > 0 and plan.clamped_values == ort.clamped_values
    mine, theirs = plan.state_dict(), ort.state_dict()
    for what in ("params", "optimizer"):
        assert set(mine[what]) == set(theirs[what]) and mine[what]
        for name, value in mine[what].items():
            np.testing.assert_array_equal(value, theirs[what][name], err_msg=name)
    again = PlanLearner.from_bundle(bundle, lr=0.01, update=update)
    again.load_state_dict(mine)
    x = np.ones((2, *plan.sig.input_shape), np.float32)
    np.testing.assert_array_equal(again.step(x, np.array([1, 2])), ort.step(x, np.array([1, 2])))
    again.end_sample(), ort.end_sample()
    for key, value in again.parameters().items():
        np.testing.assert_array_equal(value, ort.parameters()[key], err_msg=key)


def test_shared_checks_refuse_bad_steps_and_checkpoints(bundle):
    pytest.importorskip("onnxruntime")
    plan = PlanLearner.from_bundle(bundle)
    x = np.zeros((2, *plan.sig.input_shape), np.float32)
    with pytest.raises(ValueError, match="do not fit the learning graph"):
        plan.step(x[:, :1], np.array([0, 1]))
    with pytest.raises(ValueError, match=r"label\(s\) \[0, 10\] outside the 10 classes"):
        plan.step(x, np.array([0, 10]))
    plan.step(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="batch changed within a sample"):
        plan.step(x[:1], np.array([0]))
    state = plan.state_dict()
    name = next(iter(state["params"]))
    with pytest.raises(ValueError, match=f"the checkpoint's {name} has shape"):
        plan.load_state_dict({**state, "params": {**state["params"], name: np.zeros(3, np.float32)}})
    with pytest.raises(ValueError, match="written for another model or optimizer"):
        plan.load_state_dict({**state, "optimizer": {}})
    with pytest.raises(ValueError, match="is not an input of the learning graph"):
        plan.set_parameters({"nope.weight": np.zeros(1)})


# ---- with TensorRT and a GPU ------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("update", ["sample", "step"])
def test_trt_learner_matches_ort_learner_and_eager_stop(bundle, tmp_path, update):
    """Same bundle, same frames and labels: outputs equal every step (spikes identical, potentials to
    1e-5), predictions at sample ends, parameters after 60 steps to 1e-5 against OrtLearner and eager
    STOP; then a state_dict round trip continues identically."""
    from stoprt.export.model_file import load_model
    from stoprt.export.ort_learner import OrtLearner
    from stoprt.runtime.stop import STOP
    lr = LR if update == "sample" else 0.01
    trt = TrtLearner.from_bundle(bundle, lr=lr, update=update, cache_dir=tmp_path)
    ort = OrtLearner.from_bundle(bundle, lr=lr, update=update)
    net, _ = load_model(bundle / "model.stoprt")
    L.freeze_batchnorm(net)
    stop = STOP(net, torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=DECAY),
                update=update, compile="eager")
    rng = np.random.default_rng(3)
    spiking = 0
    for t in range(60):
        x = (rng.random((2, *trt.sig.input_shape)) < 0.3).astype(np.float32) * 2.0
        y = rng.integers(0, CLASSES, 2)
        out_t, out_o = trt.step(x, y), ort.step(x, y)
        out_e = stop.step(torch.from_numpy(x), torch.from_numpy(y)).numpy()
        np.testing.assert_allclose(out_t, out_o, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
        np.testing.assert_allclose(out_t, out_e, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
        for name, s in ort.state().items():
            if name.endswith(".s"):
                assert np.array_equal(trt.state()[name], s), f"step {t}: spikes of {name} differ"
        if (t + 1) % 10 == 0:
            spiking += int(trt.output_sum.sum() > 0)
            assert np.array_equal(trt.end_sample(), ort.end_sample())
            stop.end_sample()
    assert trt.updates == ort.updates == stop.stats.updates > 0 and trt.rejected_updates == 0
    assert trt.clamped_values == ort.clamped_values and spiking >= 3
    want = ort.parameters()
    for key, value in trt.parameters().items():
        np.testing.assert_allclose(value, want[key], rtol=0, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(value, net.state_dict()[key].numpy(), rtol=0, atol=1e-5, err_msg=key)
    saved = trt.state_dict()
    again = TrtLearner.from_bundle(bundle, lr=lr, update=update, cache_dir=tmp_path)
    again.load_state_dict(saved)
    x = np.ones((1, *trt.sig.input_shape), np.float32)
    np.testing.assert_array_equal(again.step(x, np.array([1])), trt.step(x, np.array([1])))
    assert again.end_sample() is not None and trt.end_sample() is not None
    for key, value in trt.parameters().items():
        np.testing.assert_array_equal(again.parameters()[key], value, err_msg=key)


@needs_gpu
def test_engines_are_cached_and_batches_1_and_16_run(bundle, tmp_path):
    first = TrtLearner.from_bundle(bundle, cache_dir=tmp_path)
    engines = sorted(tmp_path.glob("*.engine"))
    assert [p.name.split(".")[0] for p in engines] == ["learn_step", "update"]
    stamps = [p.stat().st_mtime_ns for p in engines]
    TrtLearner.from_bundle(bundle, cache_dir=tmp_path)  # loads them: nothing rebuilt
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("*.engine"))] == stamps
    assert not list(tmp_path.glob("*.tmp*")), "a temporary file of the atomic write was left"
    for batch in (1, 16):
        out = first.step(np.ones((batch, *first.sig.input_shape), np.float32), np.zeros(batch, np.int64))
        assert out.shape == (batch, CLASSES) and np.isfinite(out).all()
        assert first.end_sample().shape == (batch,)
    with pytest.raises(ValueError, match="max_batch 16"):
        first.step(np.ones((17, *first.sig.input_shape), np.float32), np.zeros(17, np.int64))


@needs_gpu
def test_stream_tensorrt_learn_resume_equals_an_uninterrupted_run(bundle, tmp_path):
    from stoprt.runtime.checkpoint import load_array_checkpoint

    def stream(ck, *extra):
        return subprocess.run([sys.executable, "-m", "stoprt.cli", "stream", "--source", "builtin:digits:12",
                               "--model", str(bundle), "--backend", "tensorrt", "--learn", "--size", "8",
                               "--checkpoint", str(ck), "--quiet", "--json", str(ck) + ".json", *extra],
                              capture_output=True, text=True, timeout=600)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run = stream(whole)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "whole.json").read_text())["updates"] > 0
    assert stream(parts, "--max-steps", "40").returncode == 0
    second = stream(parts, "--resume")
    assert second.returncode == 0 and "resumed at step" in second.stderr, second.stderr
    a, b = load_array_checkpoint(whole / "session.npz"), load_array_checkpoint(parts / "session.npz")
    assert a["session"] == b["session"] and a["learner_stats"] == b["learner_stats"]
    for what in ("params", "optimizer"):
        for name, value in a["learner_state"][what].items():
            np.testing.assert_allclose(b["learner_state"][what][name], value, rtol=0, atol=1e-6, err_msg=name)
