"""What the STOP and BPTT learners share: losses, input checks, guarded optimizer updates.

A learner is fed one time step at a time (``step``) and told where a sample ends (``end_sample``).
Gradients land in each parameter's ``.grad``; the wrapped ``torch.optim`` optimizer applies them.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import layers as L
from .learner_stats import LearnerStats

log = logging.getLogger("stoprt")

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Per-step cross-entropy of the step's output (spikes of a LIF head, potential of a readout)."""
    return F.cross_entropy(output, target)


def mse_one_hot(output: Tensor, target: Tensor) -> Tensor:
    """Per-step mean squared error between the output and the one-hot target."""
    return F.mse_loss(output, F.one_hot(target, output.shape[1]).to(output.dtype))


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "mse": mse_one_hot}


# The losses' gradients with respect to the output, written out for the static step (which runs no
# autograd): no host reads, no data-dependent shapes (a one-hot by scatter, not F.one_hot, which
# reads the labels' range on the host).

def cross_entropy_grad(output: Tensor, target: Tensor) -> Tensor:
    """d cross_entropy / d output ``[B, K]`` = (softmax(output) - one_hot(target)) / B.

    Computed by the kernels autograd runs for :func:`cross_entropy` (log-softmax, then the backward
    of the batch-mean NLL and of the log-softmax), so that it equals the eager learner's bit for bit.
    """
    aten = torch.ops.aten
    log_p = torch.log_softmax(output, 1)
    total = output.new_full((), output.shape[0])  # the mean's divisor, as nll_loss computes it
    grad = aten.nll_loss_backward(output.new_ones(()), log_p, target, None, 1, -100, total)
    return aten._log_softmax_backward_data(grad, log_p, 1, output.dtype)


def mse_one_hot_grad(output: Tensor, target: Tensor) -> Tensor:
    """d mse_one_hot / d output ``[B, K]`` = 2 (output - one_hot(target)) / (B K), as autograd's."""
    one_hot = torch.zeros_like(output).scatter_(1, target.view(-1, 1), 1.0)
    return one_hot.sub_(output).mul_(-2.0 / output.numel())


LOSS_GRADS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": cross_entropy_grad, "mse": mse_one_hot_grad}


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite.

    A sum per tensor screens them (NaN and Inf propagate through it, and a sum is one cheap read where
    ``isfinite`` makes several passes), read in one go; only a tensor whose sum is not finite, which a
    large finite one can also overflow to, gets the exact element-wise test.
    """
    # detached: cheaper than a no_grad context around two calls (a step's input rarely needs it)
    tensors = [t.detach() if t.requires_grad else t for t in tensors]
    if len(tensors) == 1:  # a step's input: two calls
        if math.isfinite(tensors[0].sum().item()):
            return True
    elif all(map(math.isfinite, torch.stack([t.sum() for t in tensors]).tolist())):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _out_of_range(target: Tensor, classes: int) -> bool:
    if target.device.type == "cpu":  # a few labels: read them rather than run four tensor ops
        labels = target.reshape(-1).tolist()
        return bool(labels) and (min(labels) < 0 or max(labels) >= classes)
    return bool(((target < 0) | (target >= classes)).any())


class Learner:
    """Base of :class:`~stoprt.runtime.stop.STOP` and :class:`~stoprt.runtime.bptt.BPTT`.

    Args:
        net: a network of stoprt layers; its last layer is a LIF or LeakyReadout.
        optimizer: any ``torch.optim`` optimizer over (some of) ``net``'s parameters. Parameters it
            does not hold are frozen; one holding any other tensor is refused (``ValueError``).
        loss: ``"ce"`` (per-step cross-entropy on the output; the paper's on spikes), ``"mse"``
            (per-step MSE to one-hot) or a callable ``(output [B, K], target [B]) -> scalar``.
        check_inputs: reject NaN/Inf inputs and bad labels with a clear error (one reduction per step).
        keep_last_good: copy the learned parameters before each update so that one producing
            NaN/Inf from finite gradients can be undone (one parameter copy at update time; on a
            small board you may trade it away: then such an update raises FloatingPointError).
            Non-finite gradients are refused either way.
    """

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, loss: str | LossFn = "ce",
                 check_inputs: bool = True, keep_last_good: bool = True) -> None:
        # The explicit gradient of a named loss (None for a callable): what the static step uses.
        self.loss_grad: Callable[[Tensor, Tensor], Tensor] | None = None
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a callable")
            loss, self.loss_grad = LOSSES[loss], LOSS_GRADS[loss]
        self.net, self.optimizer, self.loss_fn = net, optimizer, loss
        self.check_inputs, self.keep_last_good = check_inputs, keep_last_good
        # Called with the parameters holding gradients before each update; data-parallel training
        # sets it to average gradients across processes.
        self.grad_sync: Callable[[list[Tensor]], None] | None = None
        self.stats = LearnerStats()
        # The summed outputs of the sample in progress [B, K] (its prediction at end_sample), None
        # between samples; a stream session reads it rather than summing the outputs again.
        self.output_sum: Tensor | None = None
        self.sample_steps = 0
        self._input_shape: tuple[int, ...] | None = getattr(net, "input_shape", None)
        self._sample_shape: torch.Size | None = None
        unsized = [n for n in L.neurons(net) if isinstance(n, L.LIF) and n.threshold is None]
        if unsized:
            raise ValueError(f"{len(unsized)} LIF layer(s) with threshold='{unsized[0].granularity}' have no "
                             "size yet: pass shape=... or Sequential(..., input_shape=...)")
        self._held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        _check_optimizer_holds(net, optimizer)
        for p in net.parameters():
            if id(p) not in self._held:
                p.requires_grad_(False)

    # ---- inputs -------------------------------------------------------------------------------
    def _check_step_input(self, x: Tensor) -> None:
        self._check_shape(x)
        if self.check_inputs and not all_finite([x]):
            raise ValueError(f"input at step {self.sample_steps} of the sample contains NaN or Inf")

    def _check_shape(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"a step's input must be a torch.Tensor, got {type(x).__name__}")
        if self._input_shape is not None and tuple(x.shape[1:]) != self._input_shape:
            raise ValueError(f"input of shape {tuple(x.shape)} does not fit the network: expected "
                             f"[B, {', '.join(map(str, self._input_shape))}]")
        if self._sample_shape is not None and x.shape != self._sample_shape:
            raise ValueError(f"input shape changed within a sample: {tuple(self._sample_shape)} then "
                             f"{tuple(x.shape)}; call end_sample() between samples")
        self._sample_shape = x.shape

    def _check_target(self, output: Tensor, target: Tensor) -> None:
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"targets must be integer class indices, got dtype {target.dtype}")
        if target.shape != output.shape[:1]:
            raise ValueError(f"targets of shape {tuple(target.shape)} do not match the batch of "
                             f"{output.shape[0]}")
        if self.check_inputs and _out_of_range(target, output.shape[1]):
            raise ValueError(f"labels out of range: the network has {output.shape[1]} classes, got "
                             f"labels from {int(target.min())} to {int(target.max())}")

    def _forward(self, x: Tensor) -> Tensor:
        self._check_step_input(x)
        try:
            out = self.net(x)
        except RuntimeError as err:
            if "size" in str(err) or "shape" in str(err):
                raise ValueError(f"input of shape {tuple(x.shape)} does not fit the network: {err}") from err
            raise
        self.sample_steps += 1
        self.stats.steps += 1
        detached = out.detach()
        self.output_sum = detached.clone() if self.output_sum is None else self.output_sum + detached
        return out

    def _loss(self, out: Tensor, target: Tensor) -> Tensor:
        target = target.to(out.device)
        self._check_target(out, target)
        loss = self.loss_fn(out, target.long())
        self.stats.last_loss = float(loss.detach())
        return loss

    # ---- updates ------------------------------------------------------------------------------
    def _learned(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _apply_update(self) -> bool:
        """Run the optimizer on the accumulated ``.grad``; refuse updates that would make NaN/Inf.

        Returns whether the update was applied. A refused update keeps the last good parameters
        (and optimizer state), counts in ``stats.rejected_updates`` and is logged.
        """
        params = self._learned()
        if not params:
            return False
        if self.grad_sync is not None:
            self.grad_sync(params)
        if not all_finite([p.grad for p in params]):
            self._reject("a gradient is NaN or Inf")
            return False
        saved = [p.detach().clone() for p in params] if self.keep_last_good else None
        self.optimizer.step()
        if not all_finite(params):
            if saved is None:
                raise FloatingPointError("an update from finite gradients made a parameter NaN or Inf "
                                         "(keep_last_good=False, so it cannot be undone)")
            with torch.no_grad():
                for p, old in zip(params, saved):
                    p.copy_(old)
            self._reject("the update would make a parameter NaN or Inf")
            return False
        for n in L.neurons(self.net):
            self.stats.clamped_values += n.constrain_()
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.updates += 1
        return True

    def _reject(self, why: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.rejected_updates += 1
        log.warning("stoprt: update %d refused: %s; parameters keep their last good values",
                    self.stats.updates + self.stats.rejected_updates, why)

    # ---- samples ------------------------------------------------------------------------------
    def _finish_sample(self) -> Tensor | None:
        prediction = None if self.output_sum is None else self.output_sum.argmax(1)
        L.reset_state(self.net)
        self.output_sum, self._sample_shape = None, None
        if self.sample_steps:
            self.stats.samples += 1
        self.sample_steps = 0
        return prediction

    @torch.no_grad()
    def predict(self, x_seq: Tensor) -> Tensor:
        """Class predictions ``[B]`` for a whole sample ``[T, B, ...]`` without learning.

        Uses the plain dynamics and leaves no state behind (any sample in progress is discarded).
        """
        if x_seq.dim() < 2 or x_seq.shape[0] == 0:
            raise ValueError(f"predict takes a sample [T, B, ...] with T >= 1, got shape {tuple(x_seq.shape)}")
        switchable = [m for m in self.net.modules() if hasattr(m, "stop_mode")]
        stop_flags, was_training = [m.stop_mode for m in switchable], self.net.training
        L.set_stop_mode(self.net, False)
        L.reset_state(self.net)
        self.net.eval()
        try:
            total = sum(self.net(x_t) for x_t in x_seq)
        finally:
            L.reset_state(self.net)
            self.net.train(was_training)
            for m, flag in zip(switchable, stop_flags):
                m.stop_mode = flag
            self.output_sum, self._sample_shape, self.sample_steps = None, None, 0
        return total.argmax(1)


def _check_optimizer_holds(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer built over other tensors than ``net``'s parameters: the learner computes
    gradients only for the network's own, so it would step nothing (typically an optimizer made
    before ``copy.deepcopy(net)``, or over another model) and every parameter would stay frozen."""
    own = {id(p) for p in net.parameters()}
    foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
    if not foreign:
        return
    held = sum(len(group["params"]) for group in optimizer.param_groups)
    shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    which = "none" if len(foreign) == held else f"{held - len(foreign)}"
    raise ValueError(f"the optimizer holds {held} tensor(s) and {which} of them are parameters of the "
                     f"network (not the network's: shapes {shapes}); build it from this network, e.g. "
                     "torch.optim.Adam(net.parameters()), after any copy.deepcopy of the network")
