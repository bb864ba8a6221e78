"""Smoke test of examples/benchmarks/step_bench.py: the quick run on CPU writes every row.

It checks that each measurement exists and is positive, never how fast anything is (speed targets
are the benchmark's to show, on a quiet machine).
"""

import importlib.util
import inspect
import json
from pathlib import Path

from stoprt.runtime.stop import STOP

BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "step_bench.py"
ROWS = ("eager_learn", "eager_infer", "eager_predict", "static_learn", "static_infer", "static_predict",
        "floor_fwd_bwd", "floor_fwd")
FUSED = ("fused_learn", "fused_infer", "fused_predict")


def test_quick_run_writes_every_row(tmp_path):
    # In this process: the script's own process would only add a torch start-up (its stream row runs
    # `stoprt stream` in a subprocess either way).
    spec = importlib.util.spec_from_file_location("step_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "step"
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "step_bench.json").read_text())
    assert result["machine"]["cpu"] and result["machine"]["torch"] and result["machine"]["name"].startswith("cpu-")
    rows = {(r["net"], r["batch"], r["row"]): r for r in result["steps"]}
    static = "compile" in inspect.signature(STOP).parameters
    for net in ("mlp", "dvs_gesture", "vgg11"):
        for batch in (1, 16):
            for row in ROWS:
                r = rows[net, batch, row]
                if row.startswith("static") and not static:
                    assert not r["available"] and "compile" in r["why"]
                    continue
                assert r["available"], r
                assert r["median_us"] > 0 and r["best_us"] > 0
                if not row.startswith("floor"):
                    assert r["over_floor"] > 0
            if static:
                assert rows[net, batch, "static_learn"]["mode"] == "static"
            for row in FUSED:  # the quick run fuses the mlp at batch 1 only (each is a compile)
                r = rows[net, batch, row]
                if (net, batch) == ("mlp", 1):
                    assert r["available"] and r["mode"] == "fused" and r["median_us"] > 0, r
                    assert r["first_sample_s"] > r["median_us"] * 1e-6  # the compile is in the first sample
                else:
                    assert not r["available"] and "--fused-nets" in r["why"]
    memory = result["memory"]
    assert [m["T"] for m in memory["rows"]] == [3, 6, 12]
    assert all(m["held_state_bytes"] > 0 for m in memory["rows"])
    stream = result["stream"]
    assert "error" not in stream, stream
    assert stream["steps"] == 40 and stream["steps_per_s"] > 0 and stream["startup_s"] > 0
    assert stream["steps_per_cpu_s"] > 0 and 0 < stream["first_step_s"] < stream["wall_s"]
    overhead = result["stream_overhead"]
    assert overhead["steps"] > 0
    assert all(overhead[f"{k}_{c}_us_per_step"] > 0 for k in ("bare", "session", "session_pipeline")
               for c in ("wall", "cpu"))
    assert len(overhead["processes"]) == 1 and "session_pipeline_overhead_wall" in overhead["processes"][0]
    table = (out / "step_bench.md").read_text()
    assert all(net in table for net in ("mlp", "dvs_gesture", "vgg11")) and "steps/s" in table


def test_op_counts_of_a_sample_end_do_not_grow_with_depth():
    """examples/benchmarks/op_counts.py: outside the replayed graphs a sample's end is a fixed handful
    of ops (the fused reset and clamps), whatever the network's depth; each counted row is there."""
    ops = _op_counts()
    shallow, deep = ops.counts_for("mlp"), ops.counts_for("dvs_gesture")
    assert shallow["sample_end"]["total"] == deep["sample_end"]["total"] <= 30
    assert all(c[row]["total"] > 0 for c in (shallow, deep)
               for row in ("learn_step", "infer_step", "floor_fwd_bwd", "floor_fwd"))
    assert deep["learn_step"]["total"] > shallow["learn_step"]["total"]
    # the compiled step launches fewer kernels than the static one dispatches ops (one fused kernel
    # for each chain of elementwise ops), and still every convolution and its backward
    for c in (shallow, deep):
        learn = c["fused_learn_step"]
        assert 0 < learn["by_op"]["fused"] < learn["total"] < c["learn_step"]["total"]
        assert 0 < c["fused_infer_step"]["total"] < c["infer_step"]["total"]
    assert deep["fused_learn_step"]["by_op"]["convolution"] == 3
    assert deep["fused_learn_step"]["by_op"]["convolution_backward"] == 3


def _op_counts():
    spec = importlib.util.spec_from_file_location("op_counts", BENCH.parent / "op_counts.py")
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    return ops


def test_compiled_kernels_are_read_from_the_call_function_only():
    code = (
        "cpp_fused_add_0 = async_compile.cpp_pybinding(['float*'], '...')\n\n\n"
        "def call(args):\n"
        "    cpp_fused_add_0(buf0, arg1_1)\n"
        "    buf1 = torch.ops.aten.convolution_backward.default(buf0, arg2_1, arg3_1, None, (1, 1))\n"
        "    assert_size_stride(buf1[0], (1, 2), (2, 1), 'torch.ops.aten.convolution_backward.default')\n"
        "    extern_kernels.addmm(arg4_1, buf0, arg5_1, alpha=1, beta=1, out=buf2)\n"
        "    triton_poi_fused_mul_1.run(buf2, arg6_1, 16, stream=stream0)\n"
        "    return (buf2, )\n\n\n"
        "def benchmark_compiled_module(times=10, repeat=10):\n"
        "    cpp_fused_add_0(buf0, arg1_1)\n")
    assert _op_counts().compiled_kernels(code) == {"fused": 2, "convolution_backward": 1, "addmm": 1}
