"""The static update's optimizer step (runtime/static_optim.py) is torch.optim's own update, and the
stream's path to its first update imports neither torch._dynamo nor scikit-learn nor onnx."""

import json
import subprocess
import sys

import pytest
import torch

from stoprt.runtime.static_optim import direct_step, new_optimizer

CASES = [
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
    (torch.optim.Adam, {"lr": 1e-2, "fused": True}),  # what `stoprt stream --learn` uses on a CPU
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "dampening": 0.1}),
    (torch.optim.RMSprop, {"lr": 1e-2}),  # no direct kernel: optimizer.step() itself
]


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g, requires_grad=True), torch.randn((), generator=g, requires_grad=True),
            torch.randn(5, generator=g, requires_grad=True)]


@pytest.mark.parametrize("cls,kw", CASES, ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_direct_step_equals_optimizer_step_bit_for_bit(cls, kw):
    a, b = _params(0), _params(0)
    opt_a, opt_b = cls(a, **kw), new_optimizer(cls, b, **kw)
    step_b = direct_step(opt_b)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        if i == 3:  # hyperparameters are read at each update
            for opt in (opt_a, opt_b):
                opt.param_groups[0]["lr"] *= 0.5
        opt_a.step()
        step_b()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k, state in sa["state"].items():
        assert state.keys() == sb["state"][k].keys()
        assert all(torch.equal(v, sb["state"][k][n]) for n, v in state.items())


def test_hooks_and_schedulers_go_through_step():
    params = _params(0)
    opt = torch.optim.Adam(params, lr=1e-2)
    step = direct_step(opt)
    seen = []
    handle = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(1))
    for p in params:
        p.grad = torch.ones_like(p)
    step()
    assert seen == [1]
    handle.remove()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step()
    sched.step()  # no "scheduler before optimizer" warning: the counted step ran
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_stream_learns_without_importing_dynamo_sklearn_or_onnx():
    """The CLI's whole path, first updates included (~4 s: a subprocess)."""
    code = ("import sys, json; from stoprt import cli\n"
            "rc = cli.main(['stream', '--source', 'builtin:digits:3', '--learn', '--threads', '1', '--quiet'])\n"
            "print(json.dumps([rc] + [m for m in ('torch._dynamo', 'sklearn', 'onnx') if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    rc, *imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 0 and imported == []
