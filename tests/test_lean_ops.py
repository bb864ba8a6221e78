"""The ops whose backward keeps less than torch's: same values and gradients, less saved."""

import pytest
import torch
import torch.nn.functional as F

from stoprt.runtime import functional as SF, layers as L
from stoprt.runtime.learner import all_finite


def saved_bytes(fn, x):
    """``fn(x)`` and the bytes of the distinct storages autograd saved for its backward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return out, sum(seen.values())


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=3, stride=1, padding=1, count_include_pad=False),
                                    dict(kernel_size=2, ceil_mode=True), dict(kernel_size=2, divisor_override=3)])
def test_avg_pool_matches_torch_and_keeps_nothing(kwargs):
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(torch.nn.AvgPool2d(**kwargs)(x))
    ours, kept = saved_bytes(L.AvgPool2d(**kwargs), x)
    ref, ref_kept = saved_bytes(torch.nn.AvgPool2d(**kwargs), x)
    assert torch.equal(ours, ref)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    assert torch.allclose(g_ours, g_ref, rtol=0, atol=1e-15)
    assert kept == 0 and ref_kept == x.numel() * 8  # torch's keeps the input


def test_frozen_batchnorm_is_eval_batchnorm_and_keeps_only_the_scale():
    torch.manual_seed(0)
    bn = L.BatchNorm2d(5).double()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    L.freeze_batchnorm(bn)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    ours, kept = saved_bytes(bn, x)
    ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    assert torch.allclose(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(ref, x, grad)[0], rtol=1e-12)
    assert kept == 5 * 8  # the per-channel scale, not the [4, 5, 6, 6] input
    # learning its affine parameters (unfrozen by hand) still gets their gradients
    bn.weight.requires_grad_(True)
    out = bn(x)
    (gw,) = torch.autograd.grad(out, bn.weight, grad)
    (gw_ref,) = torch.autograd.grad(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                                 0.0, bn.eps), bn.weight, grad)
    assert torch.allclose(gw, gw_ref, rtol=1e-12)
    # frozen again, the cached map follows changed statistics (calibration, load_state_dict)
    bn.weight.requires_grad_(False)
    bn(x)
    with torch.no_grad():
        bn.running_mean.add_(1.0)
    ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(bn(x), ref, rtol=1e-12, atol=1e-12)
    bn.load_state_dict({k: v * 2 if k != "num_batches_tracked" else v for k, v in bn.state_dict().items()})
    ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(bn(x), ref, rtol=1e-12, atol=1e-12)


def test_heaviside_writes_the_comparison_as_floats():
    u = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    th = torch.tensor([0.5])
    out = SF.heaviside(u, th)
    assert out.dtype == u.dtype and out.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert SF.heaviside(u).tolist() == [[0.0, 0.0, 1.0, 1.0]]


CURVES = {"exp": lambda x: torch.exp(-1.3 * x.abs()), "atan": lambda x: 1 / (1 + (torch.pi * 1.3 * x) ** 2),
          "fast_sigmoid": lambda x: 1 / (1 + 1.3 * x.abs()) ** 2,
          "triangle": lambda x: torch.clamp(1 - 1.3 * x.abs(), min=0)}


@pytest.mark.parametrize("kind", SF.SURROGATES)
def test_spike_grad_is_the_surrogate_curve_times_the_incoming_gradient(kind):
    x = torch.arange(-50, 51, dtype=torch.float64) / 16
    g = torch.randn_like(x)
    ref = g * CURVES[kind](x)
    assert torch.allclose(SF.spike_grad(g, x, kind, 1.3), ref, rtol=1e-14, atol=0)
    assert torch.equal(x, torch.arange(-50, 51, dtype=torch.float64) / 16)  # untouched without scratch
    assert torch.allclose(SF.spike_grad(g, x.clone(), kind, 1.3, scratch=True), ref, rtol=1e-14, atol=0)
    phi = SF.spike_grad(torch.ones_like(x), x, kind, 1.3)  # the surrogate derivative itself
    assert phi[50] == 1.0 and bool((phi >= 0).all())


def test_all_finite_is_exact_where_the_sum_screen_overflows():
    big = torch.full((4,), 3e38)  # finite, but its float32 sum is inf
    assert all_finite([torch.ones(3), big])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf"), -float("inf")])])  # sums to NaN, still caught
