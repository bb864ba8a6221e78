"""ATen ops dispatched per STOP step and per sample end, against the plain-torch floor: a count, not a time.

    python examples/benchmarks/op_counts.py            # prints a table; --json PATH writes it too

On a GPU a replayed CUDA graph costs about a few microseconds per kernel at streaming batch sizes,
and an op outside the graphs costs a launch from the host, so counting the ops of a step is a
machine-independent view of what the GPU rows of ``step_bench.py`` measure; it runs on a CPU.

Counted (views, which launch nothing, left out), batch 1, STOP-WTL with Adam, one network each:

* ``learn_step`` / ``infer_step``: one ``step(x, y)`` / ``step(x)`` of the static program with the
  input checks made on the device (as for a GPU input: they are part of every replayed graph);
* ``sample_end``: ``end_sample()`` after a few learning steps, without the optimizer's own step (its
  op count depends on the optimizer's implementation per device, not on stoprt);
* ``floor_fwd_bwd`` / ``floor_fwd``: the same synaptic layers with ReLU (``core_bench.floor_stack``),
  forward with cross-entropy and backward, and forward alone;
* ``fused_learn_step`` / ``fused_infer_step``: the kernels of the same steps under ``compile="fused"``
  (``torch.compile``), read from the code Inductor generates for this CPU: each fused kernel
  (``fused``) and each call of an external kernel (by name). They bypass the dispatcher, hence the
  count from the code. On a GPU Inductor writes Triton kernels and makes its own fusion choices, so
  the count there may differ somewhat.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_bench import floor_stack  # noqa: E402  (the one plain-torch floor builder)

from stoprt.runtime import models  # noqa: E402
from stoprt.runtime.stop import STOP  # noqa: E402

NETS = {"mlp": {"size": 16, "classes": 10}, "dvs_gesture": {"size": 32, "classes": 11},
        "vgg11": {"size": 32, "classes": 10, "width": 0.25}}
VIEWS = {"view", "_unsafe_view", "t", "expand", "reshape", "as_strided", "permute", "unsqueeze", "squeeze",
         "transpose", "alias", "detach", "select", "slice", "_reshape_alias", "flatten", "split", "unbind"}


class OpCounter(TorchDispatchMode):
    """Counts the non-view ops dispatched while active, by name; ``paused`` ones are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(fn, pause_inside=None) -> collections.Counter:
    """The ops ``fn()`` dispatches; those inside ``pause_inside`` (an object with a ``_step``
    callable, the learner's update) are left out."""
    counter = OpCounter()
    restore = None
    if pause_inside is not None:
        inner = pause_inside._step

        def paused_step():
            counter.paused = True
            try:
                inner()
            finally:
                counter.paused = False
        pause_inside._step, restore = paused_step, inner
    try:
        with counter:
            fn()
    finally:
        if restore is not None:
            pause_inside._step = restore
    return counter.ops


KERNEL = re.compile(r"\b(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.(\w+)|torch\.ops\.aten\.(\w+)(?:\.\w+)?)\(")


def compiled_kernels(code: str) -> collections.Counter:
    """The kernels the ``call`` function of Inductor's generated ``code`` launches: ``fused`` for
    each of its own kernels, the op's name for each external one."""
    body = code[code.index("def call("):]
    body = body[:body.find("\n\n\n")] if "\n\n\n" in body else body
    kernels: collections.Counter = collections.Counter()
    for line in body.splitlines():
        for m in KERNEL.finditer(line):
            kernels["fused" if m.group(2) is None and m.group(3) is None else m.group(2) or m.group(3)] += 1
    return kernels


def fused_counts(name: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The compiled learning and inference steps' kernels (see the module doc)."""
    from torch._inductor.utils import run_and_get_code  # noqa: PLC0415

    torch.manual_seed(0)
    net = models.build_model(name, in_channels=2, **NETS[name])
    learner = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3), update="sample", compile="fused")
    learner._static.device_checks = True
    _, codes = run_and_get_code(lambda: learner.step(x, y))  # compiles learn, infer, predict, in that order
    if learner.mode != "fused" or len(codes) != 3:
        raise RuntimeError(f"{name}: the fused step did not compile here (mode {learner.mode})")
    return {"fused_learn_step": compiled_kernels(codes[0]), "fused_infer_step": compiled_kernels(codes[1])}


def counts_for(name: str) -> dict:
    torch.manual_seed(0)
    net = models.build_model(name, in_channels=2, **NETS[name])
    x = (torch.rand(1, *net.input_shape) < 0.15).float()
    y = torch.tensor([1])
    floor = floor_stack(copy.deepcopy(net))
    learner = STOP(net, torch.optim.Adam(net.parameters(), lr=1e-3), update="sample", compile="static")
    learner._static.device_checks = True  # checked on the device, as a GPU input is (inside the graphs)
    for _ in range(3):  # program built, optimizer state made
        learner.step(x, y)
    learner.end_sample()
    for _ in range(3):
        learner.step(x, y)
    ops = {"learn_step": count(lambda: learner.step(x, y)), "infer_step": count(lambda: learner.step(x))}
    ops["sample_end"] = count(learner.end_sample, pause_inside=learner._static.update)
    F.cross_entropy(floor(x), y).backward()  # first-use allocations out of the count
    ops["floor_fwd_bwd"] = count(lambda: F.cross_entropy(floor(x), y).backward())
    with torch.no_grad():
        ops["floor_fwd"] = count(lambda: floor(x))
    ops.update(fused_counts(name, x, y))
    return {k: {"total": sum(c.values()), "by_op": dict(c.most_common())} for k, c in ops.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {name: counts_for(name) for name in args.nets}
    rows = ("learn_step", "infer_step", "sample_end", "floor_fwd_bwd", "floor_fwd", "fused_learn_step",
            "fused_infer_step")
    print(f"{'net':12s} " + " ".join(f"{r:>16s}" for r in rows))
    for name, c in result.items():
        print(f"{name:12s} " + " ".join(f"{c[r]['total']:16d}" for r in rows))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
