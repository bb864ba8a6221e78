"""Export STOP's learning step as ONE ONNX graph, run by an inference engine without torch or autograd.

The graph is a pure function (see issue 13 and ``static-step.md``, "ONNX learning graph")::

    (x, target, *state, *grads, *params) -> (y, *new_state, *new_grads)

* ``state``: each neuron's membrane ``u`` and spikes ``s`` and every forward trace (``w_trace``,
  ``b_trace``, ``th_trace``, ``a_trace``), named ``state.<layer path>.<name>``, each ``[B, *shape]``
  (a bias trace is a scalar, ``[]``); zeros at a sample's start, as in the learners;
* ``grads``: the gradient accumulators of the learned parameters, ``grad.<param name>``, shaped like
  the parameter; zeros after each update;
* ``params``: every parameter, ``param.<name>`` (a shared leak is one input).

The rule is not written here. The graph is the static program's learning step itself
(:class:`stoprt.runtime.static.Program`: forward with traces, the loss's explicit gradient, the
same-step backward of :mod:`stoprt.runtime.functional`), traced by ``torch.export`` with its
buffers and ``.grad`` accumulators loaded from the graph's inputs instead of held in place. So the
graph computes what the eager and static learners compute, and a layer the static program lacks
cannot be exported (:class:`LearnGraphError` names it).

Dropout is off in the graph (deploy); frozen BatchNorm is a constant per-channel map. The batch
dimension is dynamic. The signature (names, shapes without batch, loss) is stored in the model's
``metadata_props`` like the inference step graph's (:class:`~stoprt.export.onnx_step.StepSignature`).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import Tensor, nn

from ..runtime import layers as L
from ..runtime.learner import LOSS_GRADS
from ..runtime.static import Program, Unsupported, compile_net
from ..runtime.wiring import WiringError, wire
from .onnx_lowering import LoweringError, lowered
from .onnx_step import (_TRACE_BATCH, DEFAULT_OPSET, OPSETS, _input_shape, _quiet_exporter, _summary, _weight_names,
                        write_graph)
from .signatures import LEARN_FORMAT, LEARN_VERSION, LearnGraphError, LearnSignature  # noqa: F401 (re-exported)

class LearnStep(nn.Module):
    """The static program's learning step as a pure function (see the module doc).

    Works on a float32 copy of ``net`` with dropout off; the caller's network is untouched. Each call
    builds the program anew on the given parameters, so that ``torch.export`` sees every buffer and
    accumulator as a function of the inputs.
    """

    def __init__(self, net: nn.Module, loss: str, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        if loss not in LOSS_GRADS:
            raise LearnGraphError(f"unknown loss {loss!r}; the learning graph supports {sorted(LOSS_GRADS)}")
        net = copy.deepcopy(net).float()
        L.reset_state(net)
        L.set_stop_mode(net, False)
        net.train()
        for m in net.modules():
            if isinstance(m, L.Dropout):
                m.eval()  # off at deploy: its mask is all ones
        with torch.no_grad():  # lazily shaped thresholds come into being at a first step
            net(torch.zeros(1, *input_shape))
        L.reset_state(net)
        try:
            wire(net)
            compile_net(net)
        except (Unsupported, WiringError) as err:
            raise LearnGraphError(f"cannot export the learning step: {err}") from err
        self.net, self.loss_grad, self.input_shape = net, LOSS_GRADS[loss], input_shape
        self.param_names = [n for n, _ in net.named_parameters()]
        self.learned = [n for n, p in net.named_parameters() if p.requires_grad]
        first = {id(p): n for n, p in net.named_parameters()}
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {}  # every place a parameter is held
        for m in net.modules():
            for attr, p in m._parameters.items():
                if p is not None:
                    self.slots.setdefault(first[id(p)], []).append((m, attr))
        self.paths = {id(m): path for path, m in net.named_modules()}
        self.originals = dict(net.named_parameters())
        with self._bound():
            program, _ = self._program(torch.zeros(_TRACE_BATCH, *input_shape), self.parameters_list())
            self.state_names = self._state_names(program)

    @contextlib.contextmanager
    def _bound(self):
        """Put the Parameters back after a call has bound plain tensors in their place."""
        try:
            yield
        finally:
            for name, p in self.originals.items():
                for m, attr in self.slots[name]:
                    m._parameters[attr] = p
            L.reset_state(self.net)

    def parameters_list(self) -> list[Tensor]:
        return [self.originals[n].detach() for n in self.param_names]

    def _program(self, x: Tensor, params: list[Tensor], dry_run: bool = True) -> tuple[Program, list[Tensor]]:
        """A fresh program over ``params`` (clones of the inputs; the learned ones with zero ``.grad``).
        Without ``dry_run`` its construction skips the learning step on zeros (a second step in the
        traced graph, dead after the reset, that only made the trace slower)."""
        grads = []
        for name, value in zip(self.param_names, params):
            t = value.clone()
            if name in self.learned:
                t.requires_grad_(True)
                t.grad = torch.zeros_like(value)
                grads.append(t.grad)
            for m, attr in self.slots[name]:
                m._parameters[attr] = t  # a plain tensor stands in for the Parameter during the trace
        # No accumulators for the program to zero: the caller loads them (its dry run's sums are overwritten).
        return (Program if dry_run else _AllocatingProgram)(self.net, self.loss_grad, x, []), grads

    def _state_names(self, program: Program) -> list[str]:
        """``state.<layer path>.<name>`` of each buffer, by the name the op publishes it under."""
        names = []
        for op in program.ops:
            for t in op.state():
                m = op.m
                attr = next(k for k, v in vars(m).items() if v is t)
                names.append(f"state.{self.paths[id(m)]}.{attr}")
        return names

    def forward(self, x: Tensor, target: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        n_s, n_g = len(self.state_names), len(self.learned)
        state, grads_in, params = flat[:n_s], flat[n_s:n_s + n_g], flat[n_s + n_g:]
        # lowered(): the backward kernels ONNX lacks, traced as forward ops (onnx_lowering)
        with torch.no_grad(), self._bound(), lowered():
            program, grads = self._program(x, list(params), dry_run=False)
            buffers = [t for op in program.ops for t in op.state()]
            for buf, value in zip(buffers, state):
                buf.copy_(value)
            for g, value in zip(grads, grads_in):
                g.copy_(value)
            y = program.learn(x, target)
            return (y.clone(), *[b.clone() for b in buffers], *[g.clone() for g in grads])


class _AllocatingProgram(Program):
    """A :class:`Program` whose construction runs only the forward on zeros: the ops allocate their
    buffers there; the backward allocates nothing (it adds into the given ``.grad``)."""

    ready = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ready = True

    def learn(self, x: Tensor, target: Tensor) -> Tensor:
        return super().learn(x, target) if self.ready else x


def export_learn_step(net: nn.Module, path: str | os.PathLike, *, loss: str = "ce", input_shape=None,
                      opset: int = DEFAULT_OPSET, input_spec: dict | None = None) -> LearnSignature:
    """Export STOP's learning step of ``net`` to the ONNX file ``path`` (atomically); returns its signature.

    Args:
        net: a network of stoprt layers that the static STOP step supports. Left as it is.
        loss: ``"ce"`` or ``"mse"`` (the learners' named losses).
        input_shape: one step's input without batch; default ``net.input_shape``.
        opset: ONNX opset, one of 18, 19, 20.
        input_spec: how the input is made from events (stored in the metadata).
    """
    if opset not in OPSETS:
        raise LearnGraphError(f"opset {opset} is not supported; choose one of {OPSETS}")
    shape = _input_shape(net, input_shape)
    fn = LearnStep(net, loss, shape)
    params = fn.parameters_list()
    x = torch.zeros(_TRACE_BATCH, *shape)
    target = torch.zeros(_TRACE_BATCH, dtype=torch.int64)
    with torch.no_grad(), fn._bound():
        program, grads = fn._program(x, params)
        program.learn(x, target)
        buffers = [t for op in program.ops for t in op.state()]
        out_shape = list(program.last_out.shape[1:])
    state = [torch.zeros_like(b) for b in buffers]
    accs = [torch.zeros_like(g) for g in grads]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = {"x": {0: batch}, "target": {0: batch},
               "flat": tuple([{0: batch} if s.dim() else None for s in state] + [None] * (len(accs) + len(params)))}
    pnames = [f"param.{n}" for n in fn.param_names]
    gnames = [f"grad.{n}" for n in fn.learned]
    sig = LearnSignature(input_name="x", input_shape=list(shape), output_name="y", output_shape=out_shape,
                         state=[[n, list(s.shape[1:]) if s.dim() else None] for n, s in zip(fn.state_names, state)],
                         params=[[n, list(p.shape)] for n, p in zip(pnames, params)],
                         weights=_weight_names(fn), params_as_inputs=True,
                         buffers=[k for k, _ in fn.net.named_buffers()], opset=opset, input_spec=input_spec,
                         loss=loss, grads=[[n, list(g.shape)] for n, g in zip(gnames, accs)],
                         learned=[f"param.{n}" for n in fn.learned])
    args = (x, target, *state, *accs, *params)
    with _quiet_exporter():
        try:
            traced = torch.export.export(fn, args, dynamic_shapes=dynamic, strict=False)
        except LoweringError as err:
            raise LearnGraphError(f"cannot export the learning step: {err}") from err
        except Exception as err:  # torch.export raises many types; keep its own summary
            raise LearnGraphError(f"tracing the learning step failed: {_summary(err)}") from err
        try:
            program = torch.onnx.export(traced, args, None, dynamo=True, opset_version=opset,
                                        input_names=["x", "target", *fn.state_names, *gnames, *pnames],
                                        output_names=["y", *sig.state_outputs, *sig.grad_outputs],
                                        external_data=False, verbose=False)
        except Exception as err:  # the exporter raises many types; keep its own summary
            raise LearnGraphError(f"ONNX export of the learning step failed: {_summary(err)}") from err
    proto = program.model_proto
    _check_graph(proto)
    write_graph(proto, sig, path)
    return sig


def _check_graph(proto) -> None:
    import onnx
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise LearnGraphError(f"the exported learning graph is not valid ONNX: {str(err)[:500]}") from err
    if {"Loop", "Scan", "If"} & {n.op_type for n in proto.graph.node}:
        raise LearnGraphError("the learning graph contains control flow (Loop/Scan/If); expected one plain step")


def graph_ops(path: str | os.PathLike) -> set[str]:
    """The ONNX op types a graph file uses (for the engines' operator-support checks)."""
    import onnx
    proto = onnx.load(str(path))
    return {n.op_type for n in proto.graph.node}
