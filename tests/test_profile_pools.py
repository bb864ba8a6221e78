"""``stoprt profile`` reports the CUDA graphs' memory pool of the static STOP step, and says on a CPU
that it does not apply."""

import pytest
import torch

from stoprt.devices.cost.measure import graph_pool_mib, measure
from stoprt.devices.cost.profile import format_table
from stoprt.runtime import models


def _row(device, pool=None, mode="stop", T=4):
    return {"model": "mlp", "mode": mode, "backend": "torch", "device": device, "T": T, "batch": 2, "status": "ok",
            "graph_pool_mib": pool}


def test_on_a_cpu_the_pool_does_not_apply():
    net = models.mlp(in_channels=2, size=8, classes=3)
    assert graph_pool_mib({"batch": 2}, net, torch.device("cpu")) is None
    assert "does not apply" in format_table([_row("cpu"), _row("cpu", mode="bptt")])


def test_the_table_states_the_pool_on_cuda():
    text = format_table([_row("cuda", 12.0), _row("cuda", 12.0, T=100), _row("cuda", None, mode="bptt")])
    assert "CUDA graph pool of the static STOP step" in text and "12.0 MiB" in text
    assert "was not captured" in format_table([_row("cuda", None)])
    assert "graph pool" not in format_table([_row("cpu", mode="bptt")])  # no STOP row: nothing to say


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs are captured only there)")
def test_a_cuda_profile_row_carries_the_pool():
    row = measure({"model": "mlp", "mode": "stop", "T": 3, "batch": 2, "size": 8, "device": "cuda"})
    assert row["status"] == "ok" and row["graph_pool_mib"] > 0
