"""``optimizer.step()`` of torch's SGD, Adam and AdamW, called through their functional kernels.

``torch.optim`` wraps every ``step`` (and ``add_param_group``) in guards that import
``torch._dynamo`` on first use, about 2 s of imports on a small CPU, although nothing is being
compiled. A stream that learns would stall for them at its first update. :func:`direct_step` gives
the same update without those guards: the optimizer's own ``_init_group`` fills (or creates) its
state, and the functional kernel that ``step`` would dispatch to (``torch.optim.adam.adam`` /
``torch.optim.sgd.sgd``, the undecorated function) applies it. The ``torch.optim`` object stays the
user's API and its ``state`` / ``param_groups`` stay authoritative (hyperparameters are read at each
update, so a changed learning rate applies).

Anything else runs ``optimizer.step()`` itself: other optimizer types, step hooks (the optimizer's
or global ones), a ``step`` replaced on the instance (an LR scheduler counts calls that way), and
differentiable groups. :func:`new_optimizer` creates an optimizer without the guard of
``add_param_group`` (the CLI's path to its first step).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim import adam as _adam_module, optimizer as _optimizer_module, sgd as _sgd_module


def _undecorated(fn: Callable) -> Callable:
    """The function a ``functools.wraps`` guard holds (``fn`` itself when there is none)."""
    return getattr(fn, "__wrapped__", fn)


def _adam_step(optimizer: Adam) -> None:
    kernel = _undecorated(_adam_module.adam)
    for group in optimizer.param_groups:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        has_complex = optimizer._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        beta1, beta2 = group["betas"]
        kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad=group["amsgrad"],
               has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
               weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
               foreach=group["foreach"], capturable=group["capturable"], differentiable=False,
               fused=group["fused"], grad_scale=getattr(optimizer, "grad_scale", None),
               found_inf=getattr(optimizer, "found_inf", None),
               decoupled_weight_decay=group["decoupled_weight_decay"])


def _sgd_step(optimizer: SGD) -> None:
    kernel = _undecorated(_sgd_module.sgd)
    for group in optimizer.param_groups:
        params, grads, buffers = [], [], []
        sparse = optimizer._init_group(group, params, grads, buffers)
        kernel(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
               lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
               maximize=group["maximize"], has_sparse_grad=sparse, foreach=group["foreach"],
               fused=group["fused"], grad_scale=getattr(optimizer, "grad_scale", None),
               found_inf=getattr(optimizer, "found_inf", None))
        if group["momentum"] != 0:  # buffers the kernel created go into the state, as step() does
            for p, buf in zip(params, buffers):
                optimizer.state[p]["momentum_buffer"] = buf


_STEPS: dict[type, Callable[[Optimizer], None]] = {Adam: _adam_step, AdamW: _adam_step, SGD: _sgd_step}


def direct_step(optimizer: Optimizer) -> Callable[[], None]:
    """A function that applies one ``optimizer.step()``: through the functional kernel where that is
    the same update (see the module docstring), else ``optimizer.step`` itself. Decided at each
    call, so hooks or a scheduler added later are honoured."""
    kernel = _STEPS.get(type(optimizer))
    if kernel is None:
        return optimizer.step

    def step() -> None:
        if ("step" in vars(optimizer) or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or _optimizer_module._global_optimizer_pre_hooks or _optimizer_module._global_optimizer_post_hooks
                or any(g.get("differentiable") for g in optimizer.param_groups)):
            optimizer.step()
            return
        optimizer._accelerator_graph_capture_health_check()
        with torch.no_grad():
            kernel(optimizer)
    return step


def new_optimizer(cls: type[Optimizer], params, **kwargs) -> Optimizer:
    """``cls(params, **kwargs)``, with the parameter groups added by the undecorated
    ``add_param_group`` (its guard imports ``torch._dynamo``; it only matters under
    ``torch.compile``, which is not running while an optimizer is made here)."""
    optimizer = cls.__new__(cls)
    optimizer.add_param_group = functools.partial(_undecorated(Optimizer.add_param_group), optimizer)
    try:
        cls.__init__(optimizer, params, **kwargs)
    finally:
        del optimizer.add_param_group
    return optimizer
