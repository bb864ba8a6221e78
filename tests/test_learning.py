"""On the emulated digits, STOP-WTL learns as well as BPTT with the same network, data and epochs."""

import torch

from stoprt.runtime.train import TrainConfig, train


def test_stop_wtl_within_3_points_of_bptt_on_emulated_digits():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster and steadier on a shared machine
    try:
        common = dict(model="mlp", data="digits", size=16, T=10, epochs=3, batch_size=16, lr=1e-3,
                      seed=0, progress=False)
        stop = train(TrainConfig(method="stop", learn="wtl", **common))["final_test_acc"]
        bptt = train(TrainConfig(method="bptt", **common))["final_test_acc"]
    finally:
        torch.set_num_threads(threads)
    assert bptt > 0.85, f"the BPTT baseline itself did not learn ({bptt:.3f})"
    assert stop >= bptt - 0.03, f"STOP-WTL {stop:.3f} vs BPTT {bptt:.3f}"
