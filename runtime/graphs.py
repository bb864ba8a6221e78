"""The static STOP step captured as CUDA graphs: learning step, update and inference step.

Pattern of the CUDA semantics notes ("CUDA Graphs"): warm up on a side stream (lazy cuBLAS/cuDNN
initialisation, autotuning, the optimizer's state), capture each region once into a shared private
memory pool, then replay. Inputs go in by ``copy_`` into static tensors; outputs are the program's
buffers. Everything a graph touches keeps its address (see :mod:`stoprt.runtime.static`).

An optimizer that steps on the host (torch's Adam/AdamW unless created with ``capturable=True``: they
keep their step counts on the CPU) cannot be captured; its update then runs uncaptured, once per update,
on the gradients the captured steps accumulated (a per-sample update is a small share of a sample's
time), while the steps themselves still replay as graphs.

Under ``compile="fused"`` the functions captured are the program's steps compiled by
``torch.compile`` (:mod:`stoprt.runtime.fused`), already compiled: capture records their kernels.

The warm-up runs real steps and a real update; parameters, optimizer state, counters, state buffers
and gradients are put back afterwards (in place), so capturing changes nothing the learner has.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .static import CaptureError, Program
from .static_update import GuardedUpdate, steps_on_host

WARMUP_STEPS = 3


def check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`CaptureError` for an optimizer whose steps cannot run beside captured graphs."""
    if any(group.get("differentiable") for group in optimizer.param_groups):
        raise CaptureError("a differentiable optimizer cannot be captured")


class CapturedSteps:
    """A program's ``learn`` / ``infer`` / ``update`` as replayed CUDA graphs.

    ``pool_bytes``: device memory reserved by capturing (the graphs' private pool), for profiles.
    ``update_captured``: whether the update is a graph too (see the module docstring).
    ``compiled``: the program's steps compiled (``compile="fused"``), captured instead of its own.
    """

    def __init__(self, program: Program, update: GuardedUpdate, x_like: Tensor, compiled=None) -> None:
        self.program, self._update = program, update
        self.x = torch.zeros_like(x_like)
        self.target = torch.zeros_like(program.target)
        self._learn, self._infer = ((program.learn, program.infer) if compiled is None
                                    else (compiled.learn_on, compiled.infer_on))
        try:
            check_capturable(update.optimizer)
            self.update_captured = not steps_on_host(update.optimizer)
            self._warm_up()
            before = torch.cuda.memory_reserved(x_like.device)
            self.pool = torch.cuda.graph_pool_handle()
            self.g_learn, self.g_update, self.g_infer = (torch.cuda.CUDAGraph() for _ in range(3))
            with torch.no_grad():
                with torch.cuda.graph(self.g_learn, pool=self.pool):
                    self.out_learn = self._learn(self.x, self.target)
                if update.params and self.update_captured:
                    with torch.cuda.graph(self.g_update, pool=self.pool):
                        update()
                with torch.cuda.graph(self.g_infer, pool=self.pool):
                    # (compiled steps return tensors of their own, so each graph's output is kept)
                    self.out_infer = self._infer(self.x)
            self.pool_bytes = torch.cuda.memory_reserved(x_like.device) - before
        except CaptureError:
            raise
        except Exception as err:  # noqa: BLE001  (any failure to capture means: run eager)
            raise CaptureError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err

    @torch.no_grad()
    def _warm_up(self) -> None:
        program, update = self.program, self._update
        params = update.params
        saved_params = [p.detach().clone() for p in params]
        state_before = update._state()
        saved_state = [t.clone() for t in state_before]
        counts = update.counts.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._learn(self.x, self.target)
                if params:
                    update()
                self._infer(self.x)
        torch.cuda.current_stream().wait_stream(side)
        for p, old in zip(params, saved_params):
            p.copy_(old)
        state_after = update._state()
        known = {id(t) for t in state_before}
        for t in state_after:  # state the warm-up created: zeros are a fresh one (see static_update)
            if id(t) not in known:
                t.zero_()
        for t, old in zip(state_before, saved_state):
            t.copy_(old)
        update.counts.copy_(counts)
        torch._foreach_zero_(update.grads)
        program.reset()

    def learn(self, x: Tensor, target: Tensor) -> Tensor:
        self.x.copy_(x)
        self.target.copy_(target)
        self.g_learn.replay()
        return self.out_learn

    def infer(self, x: Tensor) -> Tensor:
        self.x.copy_(x)
        self.g_infer.replay()
        return self.out_infer

    # A step of a sample that will not learn replays the inference graph: the traces it advances
    # are never read, the outputs are the same, and one graph fewer is captured.
    predict = infer

    def update(self, sync: bool = False) -> None:
        if sync or not self.update_captured:  # gradients averaged across processes first, or a host-side
            self._update()                       # optimizer: not part of the graphs
        elif self._update.params:
            self.g_update.replay()
