"""Shared by the importer tests: per-layer spike recording and the exact comparison."""

import torch

from stoprt.runtime import layers as L

T = 30


def record(net, kinds, xs):
    """Outputs of every layer of ``kinds`` (the first element of tuples) at every step: list of [T, ...]."""
    L.reset_state(net)
    mods = [m for m in net.modules() if isinstance(m, kinds)]
    rec = {id(m): [] for m in mods}
    hooks = [m.register_forward_hook(lambda m, i, o: rec[id(m)].append(o[0] if isinstance(o, tuple) else o))
             for m in mods]
    with torch.no_grad():
        for x in xs:
            net(x)
    for h in hooks:
        h.remove()
    return [torch.stack(rec[id(m)]) for m in mods]


def assert_same_spikes(theirs, ours, factors=None):
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(theirs, ours)):
        assert 0 < float(b.mean()) < 1, f"layer {i} is silent or saturated: the comparison would prove nothing"
        assert torch.equal(a, b * (factors[i] if factors else 1)), f"spikes of neuron layer {i} differ"


