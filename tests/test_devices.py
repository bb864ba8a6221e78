"""stoprt.devices: detection, board profiles and `stoprt info` on fake system trees (tests/fixtures/jetson)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stoprt.commands import device as cli
from stoprt.devices import boards, detect

FIXTURES = Path(__file__).parent / "fixtures" / "jetson"
ORIN_NANO = FIXTURES / "orin-nano-8gb-jp62"
AGX_ORIN = FIXTURES / "agx-orin-64gb-jp51"
THOR = FIXTURES / "thor-jp70"
DESKTOP = FIXTURES / "desktop-x86"


# --- detection -------------------------------------------------------------------------------


def test_detect_orin_nano_jetpack_62():
    info = detect.detect(ORIN_NANO)
    assert info.kind == "jetson"
    j = info.jetson
    assert j.model == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    assert j.soc == "tegra234"
    assert j.module == "p3767-0003"
    assert (j.l4t, j.jetpack) == ("36.4.3", "6.2")
    assert (j.board, j.board_matched_by) == ("orin-nano-8gb", "module")
    assert info.cpu.model == "Cortex-A78AE" and info.cpu.cores == 6
    assert info.mem_total_mib == pytest.approx(7802032 / 1024)
    assert info.kernel == "5.15.148-tegra"
    assert info.gpu is None  # torch is not asked about a fake tree


def test_detect_agx_orin_jetpack_51():
    info = detect.detect(AGX_ORIN)
    j = info.jetson
    assert info.kind == "jetson"
    assert j.model == "Jetson AGX Orin Developer Kit"
    assert (j.module, j.board) == ("p3701-0005", "agx-orin-64gb")
    assert (j.l4t, j.jetpack) == ("35.2.1", "5.1")
    assert info.cpu.cores == 12
    assert info.to_dict()["jetpack_release"]["tensorrt"] == "8.5"


def test_detect_thor_jetpack_7_matches_board_by_memory():
    info = detect.detect(THOR)
    j = info.jetson
    assert j.soc == "tegra264"
    assert (j.l4t, j.jetpack) == ("38.2.0", "7.0")
    assert (j.board, j.board_matched_by) == ("thor-t5000", "memory")
    assert info.board_profile.compute_capability == "11.0"
    assert info.cpu.cores == 14


def test_detect_desktop_is_cpu_only():
    info = detect.detect(DESKTOP)
    assert info.kind == "cpu"
    assert info.jetson is None and info.gpu is None
    assert info.cpu.model == "AMD Ryzen 7 5800X 8-Core Processor"
    assert info.cpu.cores == 4
    assert info.mem_total_mib == pytest.approx(32792180 / 1024)
    text = info.describe()
    assert "AMD Ryzen 7 5800X" in text and "32024 MiB" in text
    json.dumps(info.to_dict())


def test_detect_empty_tree_gives_unknowns(tmp_path: Path):
    info = detect.detect(tmp_path)
    assert info.kind == "cpu"
    assert (info.cpu.model, info.cpu.cores, info.mem_total_mib, info.kernel) == (None,) * 4
    assert "unknown" in info.describe()


def test_detect_discrete_cuda_gpu(monkeypatch):
    gpu = detect.GpuInfo(name="NVIDIA H200", total_memory_mib=143771.0, compute_capability="9.0",
                         is_integrated=False, count=2)
    monkeypatch.setattr(detect, "probe_cuda", lambda: gpu)
    info = detect.detect(DESKTOP, use_torch=True)
    assert info.kind == "cuda" and info.gpu == gpu
    assert "NVIDIA H200 (+1 more), discrete, 143771 MiB, compute capability 9.0" in info.describe()
    assert info.to_dict()["gpu"]["compute_capability"] == "9.0"


def test_probe_cuda_without_gpu_is_none():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert detect.probe_cuda() is None


def test_jetson_without_release_file_and_unknown_module(tmp_path: Path):
    dt = tmp_path / "proc" / "device-tree"
    dt.mkdir(parents=True)
    (dt / "model").write_bytes(b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\0")
    (dt / "compatible").write_bytes(b"nvidia,p3768-0000+p3767-0099\0nvidia,tegra234\0")
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:        7802032 kB\n")
    info = detect.detect(tmp_path)
    assert info.kind == "jetson"
    assert info.jetson.module == "p3767-0099"
    # 8 GB Orin: Nano and NX share SoC and DRAM size, so memory cannot pick one.
    assert info.jetson.board is None and info.jetson.l4t is None
    assert "no profile" in info.describe() and "L4T:      unknown" in info.describe()


@pytest.mark.parametrize("text, version", [
    ("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic, EABI: aarch64", "36.4.3"),
    ("# R35 (release), REVISION: 2.1, GCID: 1", "35.2.1"),
    ("# R36 (release), REVISION: 3.0, GCID: 1", "36.3.0"),
    ("# R38 (release), REVISION: 2, GCID: 1", "38.2.0"),
    ("garbage", None),
])
def test_parse_l4t_release(text, version):
    assert detect.parse_l4t_release(text) == version


def test_module_part_prefers_standalone_entry():
    assert detect.module_part(["nvidia,p3768-0000+p3767-0005-super", "nvidia,tegra234"]) == "p3767-0005"
    assert detect.module_part(["nvidia,p3449-0000-b00+p3668-0001", "nvidia,p3668-0003"]) == "p3668-0003"
    assert detect.module_part(["nvidia,tegra264"]) is None


# --- boards ----------------------------------------------------------------------------------


def test_board_profiles_and_lookup():
    nano4 = boards.get_board("orin-nano-4gb")
    assert nano4.dram_mib == 4096 and nano4.usable_mib == 2048  # "~2 GB of work" on the 4 GB part
    assert nano4.compute_capability == "8.7"
    assert [r.tensorrt for r in nano4.jetpacks] == ["8.5", "8.6", "10.3", "10.16"]
    assert [r.jetpack for r in boards.get_board("thor-t4000").jetpacks] == ["7.0 / 7.1", "7.2"]
    assert [r.jetpack for r in boards.get_board("xavier-nx-16gb").jetpacks] == ["5.1.x"]
    assert boards.board_for_module("p3767-0004").key == "orin-nano-4gb"
    assert boards.board_for_module("p3701-0004").key == "agx-orin-32gb"
    assert boards.board_for_module("p9999-0000") is None
    assert set(boards.board_keys()) >= {"orin-nano-4gb", "orin-nano-8gb", "orin-nx-8gb",
                                        "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb",
                                        "xavier-nx-8gb", "xavier-nx-16gb", "thor-t5000"}
    json.dumps(boards.get_board("thor-t5000").to_dict())


def test_unknown_board_error_lists_keys():
    with pytest.raises(boards.UnknownBoardError) as err:
        boards.get_board("orin-nano-2gb")
    assert "orin-nano-2gb" in str(err.value) and "orin-nano-4gb" in str(err.value)
    assert isinstance(err.value, KeyError)


def test_jetpack_versions():
    assert boards.jetpack_version("36.4.3") == "6.2"
    assert boards.jetpack_version("36.4.7") == "6.1 / 6.2.x"  # unknown point release: its row
    assert boards.jetpack_release("39.0.0").tensorrt == "10.16"
    assert boards.jetpack_version("32.7.4") is None  # JetPack 4: out of scope


# --- stoprt info -----------------------------------------------------------------------------


def test_info_on_fake_root(tmp_path: Path, capsys):
    out = tmp_path / "report" / "info.json"
    rc = cli.run_info(argparse.Namespace(root=str(ORIN_NANO), json=out))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "orin-nano-8gb" in printed and "JetPack 6.2" in printed and "VDD_IN: 5127.8 mW" in printed
    data = json.loads(out.read_text())
    assert data["device"]["jetson"]["board"] == "orin-nano-8gb"
    assert data["device"]["board_profile"]["usable_mib"] == 6144
    assert data["telemetry"]["gpu_load_pct"] == pytest.approx(47.3)


def test_info_bad_root_and_register(tmp_path: Path, capsys):
    assert cli.run_info(argparse.Namespace(root=str(tmp_path / "nope"), json=None)) == 2
    assert "not a directory" in capsys.readouterr().err
    parser = argparse.ArgumentParser(prog="stoprt")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["info", "--root", str(DESKTOP), "--json", str(tmp_path / "d.json")])
    assert args.func is cli.run_info
    assert args.func(args) == 0
    assert json.loads((tmp_path / "d.json").read_text())["device"]["kind"] == "cpu"


def test_cli_import_stays_light():
    code = ("import sys, stoprt.commands.device, stoprt.devices.telemetry; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
