"""stoprt.devices telemetry: tegrastats lines, sysfs readers, memory views and the sampler, on fake trees."""

from __future__ import annotations

import importlib.machinery
import json
import random
import shutil
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from stoprt.devices import detect, sysfs, telemetry
from stoprt.devices.backends import Backend, BackendUnavailable, JtopBackend, TegrastatsBackend
from stoprt.devices.sampler import TelemetrySampler
from stoprt.devices.tegrastats import parse_tegrastats

FIXTURES = Path(__file__).parent / "fixtures" / "jetson"
ORIN_NANO = FIXTURES / "orin-nano-8gb-jp62"
AGX_ORIN = FIXTURES / "agx-orin-64gb-jp51"
THOR = FIXTURES / "thor-jp70"
DESKTOP = FIXTURES / "desktop-x86"
NANO_HWMON = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"


def tegrastats_line(name: str) -> str:
    return (FIXTURES / "tegrastats" / name).read_text().splitlines()[0]


@pytest.fixture
def nano_tree(tmp_path: Path) -> Path:
    """A writable copy of the Orin Nano tree, for tests that break or change files."""
    root = tmp_path / "orin-nano"
    shutil.copytree(ORIN_NANO, root)
    return root


# --- tegrastats ------------------------------------------------------------------------------


def test_tegrastats_jetpack6_orin_nano():
    s = parse_tegrastats(tegrastats_line("jp62-orin-nano.txt"))
    assert s.timestamp == "01-15-2025 14:02:11"
    assert (s.ram_used_mib, s.ram_total_mib, s.lfb) == (3310, 7620, "12x4MB")
    assert (s.swap_used_mib, s.swap_total_mib, s.swap_cached_mib) == (0, 3810, 0)
    assert [c.online for c in s.cpus] == [True] * 3 + [False] * 3
    assert (s.cpus[0].load_pct, s.cpus[0].freq_mhz) == (12, 1728)
    assert s.cpu_load_pct == pytest.approx(8.0)
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (47, 1020)
    assert s.engines["EMC_FREQ"].load_pct == 4 and s.engines["EMC_FREQ"].freqs_mhz == [3199]
    assert s.engines["APE"].freqs_mhz == [200]
    assert s.temps_c["tj"] == 51.25 and len(s.temps_c) == 6
    assert s.rails["VDD_IN"] == telemetry.Rail(7120, 6985, None)
    assert set(s.rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert s.unknown_count == 0


def test_tegrastats_jetpack7_orin_gpc_list_and_max_rails():
    s = parse_tegrastats(tegrastats_line("jp7-orin-agx.txt"))
    assert s.gpu_load_pct == 62
    assert s.engines["GR3D_FREQ"].freqs_mhz == [918, 930] and s.gpu_freq_mhz == 930
    assert s.rails["VDD_GPU_SOC"] == telemetry.Rail(9120, 8421, 11002)
    assert s.swap_used_mib == 12 and s.swap_cached_mib == 2
    assert len(s.cpus) == 12 and sum(c.online for c in s.cpus) == 8
    assert s.engines["NVENC"].off and s.engines["NVJPG1"].off
    assert s.unknown_count == 0


def test_tegrastats_thor_gpu_without_load():
    s = parse_tegrastats(tegrastats_line("jp7-thor.txt"))
    assert s.gpu_load_pct is None
    assert s.engines["GR3D_FREQ"].freqs_mhz == [1575, 1575, 1575]
    assert s.engines["PVA0_FREQ"].freqs_mhz == [1215]
    assert len(s.cpus) == 14
    assert "soc345" not in s.temps_c  # -256C means "no reading"
    assert s.rails["VDD_CPU_SOC_MSS"].cur_mw == 8950
    assert s.unknown_count == 0


def test_tegrastats_jetpack51_agx_orin():
    s = parse_tegrastats(tegrastats_line("jp51-agx-orin.txt"))
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, 306)
    assert s.engines["VIC_FREQ"].freqs_mhz == [729] and s.engines["VIC_FREQ"].load_pct is None
    assert set(s.temps_c) == {"CPU", "Tboard", "SOC2", "Tdiode", "SOC0", "tj", "SOC1"}
    assert s.rails["VDDQ_VDD2_1V8AO"] == telemetry.Rail(302, 302, None)
    assert s.unknown_count == 0


def test_tegrastats_unitless_rails_and_bare_loads():
    s = parse_tegrastats(tegrastats_line("xavier-nx-unitless.txt"))
    assert s.rails["VDD_IN"] == telemetry.Rail(3904, 3904, None)
    assert s.rails["VDD_SOC"].cur_mw == 1186
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, None)
    assert s.engines["EMC_FREQ"].load_pct == 0 and s.engines["EMC_FREQ"].freqs_mhz == []
    assert s.temps_c["PMIC"] == 100
    assert s.unknown_count == 0


def test_tegrastats_unknown_tokens_are_counted():
    s = parse_tegrastats(tegrastats_line("unknown-tokens.txt"))
    assert s.ram_used_mib == 1200 and s.lfb == "9x4MB"
    assert s.temps_c == {"cpu": 40} and s.rails["VDD_IN"].cur_mw == 4000
    assert s.unknown == ["MTS", "fg", "0%", "bg", "0%", "QUANTUM_FLUX", "++", "GR3D_FREQ",
                         "3%@[", "??"]
    assert s.unknown_count == 10 and s.gpu_load_pct is None


def test_tegrastats_never_raises_on_junk():
    rng = random.Random(0)
    pieces = tegrastats_line("jp7-orin-agx.txt").split() + ["[", "]", "(", ")", "@", "%", "mW/"]
    for _ in range(500):
        line = " ".join(rng.choice(pieces)[: rng.randint(0, 12)] for _ in range(rng.randint(0, 30)))
        parse_tegrastats(line)
    assert parse_tegrastats("").unknown_count == 0
    assert parse_tegrastats("RAM").unknown == ["RAM"]
    assert parse_tegrastats("CPU [1%@2,x] VDD_IN").unknown == ["CPU", "[1%@2,x]", "VDD_IN"]


# --- sysfs -----------------------------------------------------------------------------------


def test_sysfs_orin_nano_gpu_and_rails():
    devfreq = sysfs.find_gpu_devfreq(ORIN_NANO)
    assert devfreq is not None and devfreq.name == "17000000.gpu"  # not the VIC devfreq
    assert sysfs.read_gpu_load_pct(ORIN_NANO) == pytest.approx(47.3)
    assert sysfs.read_gpu_freq_mhz(ORIN_NANO) == pytest.approx(1020.0)
    rails = sysfs.read_power_rails(ORIN_NANO)
    assert list(rails) == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # no "sum of shunt voltages"
    assert rails["VDD_IN"].voltage_mv == 5072 and rails["VDD_IN"].current_ma == 1011
    assert rails["VDD_IN"].power_mw == pytest.approx(5072 * 1011 / 1000)
    mem = sysfs.read_system_memory(ORIN_NANO)
    assert mem.used_mib == pytest.approx((7802032 - 4415320) / 1024)


def test_sysfs_agx_orin_two_monitors_skip_unwired_channels():
    rails = sysfs.read_power_rails(AGX_ORIN)
    assert list(rails) == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert rails["VDDQ_VDD2_1V8AO"].power_mw == pytest.approx(4992 * 60 / 1000)
    assert sysfs.read_gpu_load_pct(AGX_ORIN) == 0.0


def test_sysfs_missing_everything_gives_none(tmp_path: Path):
    assert sysfs.find_gpu_devfreq(tmp_path) is None
    assert sysfs.read_gpu_load_pct(tmp_path) is None
    assert sysfs.read_gpu_freq_mhz(tmp_path) is None
    assert sysfs.read_power_rails(tmp_path) == {}
    mem = sysfs.read_system_memory(tmp_path)
    assert (mem.total_mib, mem.available_mib, mem.used_mib) == (None, None, None)
    snap = telemetry.snapshot(tmp_path)
    assert snap["gpu_load_pct"] is None and snap["power_rails"] == {}


def test_sysfs_unreadable_files_give_partial_results(nano_tree: Path):
    hwmon = nano_tree / NANO_HWMON
    # Running as root makes chmod useless; a directory in place of a file is unreadable for anyone.
    (hwmon / "curr2_input").unlink()
    (hwmon / "curr2_input").mkdir()
    (hwmon / "in3_input").write_text("not a number\n")
    gpu = nano_tree / "sys/class/devfreq/17000000.gpu"
    (gpu / "device/load").write_bytes(b"\xff\xfe")
    (gpu / "cur_freq").unlink()
    meminfo = nano_tree / "proc/meminfo"
    meminfo.write_text("".join(l + "\n" for l in meminfo.read_text().splitlines()
                               if not l.startswith("MemAvailable")))

    rails = sysfs.read_power_rails(nano_tree)
    assert rails["VDD_IN"].power_mw == pytest.approx(5072 * 1011 / 1000)
    assert rails["VDD_CPU_GPU_CV"].current_ma is None and rails["VDD_CPU_GPU_CV"].power_mw is None
    assert rails["VDD_SOC"].voltage_mv is None and rails["VDD_SOC"].current_ma == 287
    assert sysfs.read_gpu_load_pct(nano_tree) is None
    assert sysfs.read_gpu_freq_mhz(nano_tree) is None
    mem = sysfs.read_system_memory(nano_tree)
    assert mem.total_mib is not None and mem.used_mib is None

    snap = telemetry.snapshot(nano_tree)
    assert snap["power_rails"]["VDD_CPU_GPU_CV"]["power_mw"] is None
    assert snap["mem_total_mib"] is not None and snap["mem_system_used_mib"] is None
    # Detection still works with these files broken.
    assert detect.detect(nano_tree).jetson.board == "orin-nano-8gb"


def test_sysfs_load_on_devfreq_node_itself(nano_tree: Path):
    gpu = nano_tree / "sys/class/devfreq/17000000.gpu"
    (gpu / "device/load").unlink()
    (gpu / "load").write_text("125\n")
    assert sysfs.read_gpu_load_pct(nano_tree) == pytest.approx(12.5)


# --- memory views ----------------------------------------------------------------------------


def test_process_memory_and_torch_stats():
    mem = telemetry.read_process_memory()
    assert mem.rss_mib > 1
    assert mem.uss_mib is None or 0 < mem.uss_mib <= mem.rss_mib * 1.01
    assert telemetry.read_process_memory(uss=False).uss_mib is None
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        assert telemetry.read_torch_cuda_memory(import_torch=False) is None


# --- sampler ---------------------------------------------------------------------------------


class ScriptedBackend(Backend):
    """Returns the next scripted figures per sample."""

    name = "scripted"

    def __init__(self, script: list[dict[str, float]]):
        self.script = list(script)

    def sample(self) -> dict[str, float]:
        return self.script.pop(0)


class ManualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sampler_energy_is_exact_on_scripted_power():
    clock = ManualClock()
    backend = ScriptedBackend([{"power_mw.VDD_IN": 1000.0, "power_mw.VDD_SOC": 200.0, "x": 1.0},
                               {"power_mw.VDD_IN": 3000.0, "power_mw.VDD_SOC": 200.0, "x": 5.0}])
    # An interval far beyond the test: only the start and stop samples are taken.
    sampler = TelemetrySampler([backend], interval_s=3600, clock=clock).start()
    clock.now = 2.0
    summary = sampler.stop()
    assert summary.samples == 2 and summary.duration_s == 2.0
    assert summary.energy_j == {"VDD_IN": pytest.approx(4.0), "VDD_SOC": pytest.approx(0.4)}
    assert summary.total_rail == "VDD_IN" and summary.total_energy_j == pytest.approx(4.0)
    assert summary.figures["x"].peak == 5 and summary.figures["x"].mean == 3
    per_step = sampler.summary(steps=8)
    assert per_step.energy_per_step_j == pytest.approx(0.5)
    json.dumps(per_step.to_dict())
    with pytest.raises(RuntimeError, match="one run"):
        sampler.start()


def test_sampler_sums_rails_without_input_rail_and_counts_errors():
    clock = ManualClock()

    class Broken(Backend):
        name = "broken"

        def sample(self):
            raise OSError("sensor gone")

    backend = ScriptedBackend([{"power_mw.A": 100.0, "power_mw.B": 300.0}] * 2)
    sampler = TelemetrySampler([backend, Broken()], interval_s=3600, clock=clock).start()
    clock.now = 10.0
    summary = sampler.stop()
    assert summary.total_rail == "sum" and summary.total_energy_j == pytest.approx(4.0)
    assert summary.errors == {"broken": 2}


def test_sampler_on_fake_tree_with_changing_rail(nano_tree: Path):
    curr = nano_tree / NANO_HWMON / "curr1_input"
    load = nano_tree / "sys/class/devfreq/17000000.gpu/device/load"
    steps = 50
    with TelemetrySampler(["sysfs", "process"], interval_s=0.01, root=nano_tree,
                          maxlen=16) as sampler:
        def workload():  # stands in for a run: the board draws more power halfway through
            for i in range(steps):
                if i == steps // 2:
                    curr.write_text("3033\n")
                    load.write_text("990\n")
                time.sleep(0.006)

        worker = threading.Thread(target=workload)
        worker.start()
        worker.join()
    summary = sampler.summary(steps=steps)
    low, high = 5072 * 1011 / 1000, 5072 * 3033 / 1000
    vdd_in = summary.figures["power_mw.VDD_IN"]
    assert summary.samples >= 5 and len(sampler.samples) <= 16  # ring buffer bounded
    assert vdd_in.peak == pytest.approx(high) and low < vdd_in.mean < high
    assert summary.figures["gpu.load_pct"].peak == pytest.approx(99.0)
    assert summary.figures["proc.rss_mib"].peak > 1
    assert summary.total_rail == "VDD_IN"
    # Energy lies between always-low and always-high power over the sampled span.
    span = summary.duration_s
    assert low * span / 1000 < summary.total_energy_j < high * span / 1000
    assert summary.energy_per_step_j == pytest.approx(summary.total_energy_j / steps)
    assert summary.errors == {}


def test_sampler_rejects_bad_backend_and_interval():
    with pytest.raises(ValueError, match="valid: auto"):
        TelemetrySampler(["nvml"])
    with pytest.raises(ValueError):
        TelemetrySampler(["sysfs"], interval_s=0)


def test_auto_backends_on_fake_tree(nano_tree: Path):
    names = [b.name for b in telemetry.make_backends("auto", root=nano_tree)]
    assert names[:2] == ["sysfs", "process"] and "tegrastats" not in names


# Prints the fixture lines, then idles like tegrastats until it is terminated.
FAKE_TEGRASTATS = textwrap.dedent("""
    import sys, time
    for line in open(sys.argv[1]):
        print(line, end="", flush=True)
        time.sleep(0.01)
    time.sleep(600)
""")


def test_tegrastats_backend_runs_and_stops_subprocess(tmp_path: Path):
    script = tmp_path / "fake_tegrastats.py"
    script.write_text(FAKE_TEGRASTATS)
    lines = FIXTURES / "tegrastats" / "sequence-orin-nano.txt"
    backend = TegrastatsBackend(command=[sys.executable, str(script), str(lines)])
    with TelemetrySampler([backend], interval_s=0.02) as sampler:
        assert backend.process.running
        deadline = time.monotonic() + 5
        while backend.process.lines < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
    summary = sampler.summary()
    # The stop sample sees the last line, which has the highest figures: 5000 + 4 * 500 mW.
    assert summary.figures["power_mw.VDD_IN"].peak == 7000
    assert summary.figures["gpu.load_pct"].peak == 80
    assert summary.figures["mem.system_used_mib"].last == 3040
    assert summary.final == {"tegrastats.lines": 5, "tegrastats.unknown_tokens": 0}
    assert not backend.process.running


def test_tegrastats_backend_unavailable_without_binary(monkeypatch):
    monkeypatch.setattr("stoprt.devices.tegrastats.shutil.which", lambda name: None)
    with pytest.raises(BackendUnavailable):
        TegrastatsBackend()


def test_jtop_backend_optional(monkeypatch):
    monkeypatch.delitem(sys.modules, "jtop", raising=False)
    monkeypatch.setattr("stoprt.devices.backends.importlib.util.find_spec", lambda name: None)
    with pytest.raises(BackendUnavailable):
        JtopBackend()


def test_jtop_backend_with_fake_module(monkeypatch):
    class FakeJtop:
        instances: list[FakeJtop] = []

        def __init__(self):
            self.stats = {"Power TOT": 6200, "GPU": 35, "time": "12:00", "jetson_clocks": True}
            self.closed = False
            FakeJtop.instances.append(self)

        def start(self):
            pass

        def close(self):
            self.closed = True

    module = types.ModuleType("jtop")
    module.__spec__ = importlib.machinery.ModuleSpec("jtop", None)
    module.jtop = FakeJtop
    monkeypatch.setitem(sys.modules, "jtop", module)
    backend = JtopBackend()
    backend.start()
    assert backend.sample() == {"power_mw.TOT": 6200.0, "jtop.GPU": 35.0}
    backend.stop()
    assert FakeJtop.instances[0].closed


