"""The benchmark environment: a venv with snnTorch and SpikingJelly that reuses the project's torch.

Created once (and reused while its recipe is unchanged) at ``runs/bench-env`` by::

    python -m venv runs/bench-env                     # no system site packages, no torch of its own
    # runs/bench-env/lib/python3.X/site-packages/_stoprt_project.pth:
    #   import site; site.addsitedir('<each site-packages folder of the project interpreter>')
    runs/bench-env/bin/python -m pip install --no-deps --ignore-installed \\
        snntorch==1.0.0 spikingjelly==2.0.0 loguru tensorboard absl-py

The ``.pth`` line puts the project's site-packages after the venv's own, so torch, numpy and stoprt
(editable) come from the project and are never replaced; pip never resolves dependencies
(``--no-deps``), so it cannot pull a CUDA torch, torchvision or torchaudio. The extra packages are the
ones the peers import at import time and the project does not already provide: SpikingJelly's
``activation_based.learning`` (OTTT) imports its monitor, which imports
``torch.utils.tensorboard`` (tensorboard, absl-py; protobuf comes with onnx), and its logger imports
loguru. snnTorch imports nothing beyond torch and numpy.
``--ignore-installed`` installs them here even when the project venv happens to hold a copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stoprt.runtime import atomic

PEERS = ("snntorch==1.0.0", "spikingjelly==2.0.0")
IMPORT_DEPS = ("loguru", "tensorboard", "absl-py")
RECIPE_VERSION = 1
_MARKER = "stoprt-bench-env.json"
_CHECK = ("import json, torch, snntorch, spikingjelly, stoprt\n"
          "from spikingjelly.activation_based import layer, neuron, surrogate, functional\n"
          "from spikingjelly.activation_based.learning.online_learning import ottt_online_training\n"
          "from importlib.metadata import version\n"
          "print(json.dumps({'torch': torch.__version__, 'torch_file': torch.__file__,"
          " 'snntorch': version('snntorch'), 'spikingjelly': version('spikingjelly'),"
          " 'spikingjelly_file': spikingjelly.__file__}))")


class BenchEnvError(RuntimeError):
    """The benchmark environment could not be created or does not import the peers."""


def env_python(root: Path) -> Path:
    return root / "bin" / "python"


def _project_site_dirs() -> list[str]:
    """The project interpreter's site-packages folders (its venv's, and the system's it sees)."""
    return [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]


def _recipe() -> dict:
    return {"version": RECIPE_VERSION, "peers": list(PEERS), "deps": list(IMPORT_DEPS),
            "python": sys.version.split()[0], "site_dirs": _project_site_dirs()}


def _run(cmd: list[str], what: str, timeout: float) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise BenchEnvError(f"{what} did not finish in {timeout:.0f} s") from err
    except OSError as err:  # the interpreter is missing or not executable
        raise BenchEnvError(f"{what} could not start: {err}") from err
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise BenchEnvError(f"{what} failed: {' | '.join(tail)}")
    return out.stdout


def check(root: Path) -> dict:
    """Import the peers in the environment; returns the versions it sees (and where torch is from)."""
    info = json.loads(_run([str(env_python(root)), "-c", _CHECK], "importing the peers in the bench env",
                           180).strip().splitlines()[-1])
    import torch
    if info["torch"] != torch.__version__:
        raise BenchEnvError(f"the bench env sees torch {info['torch']}, the project {torch.__version__}")
    return info


def _recorded(marker: Path) -> dict | None:
    """The recipe an earlier creation finished with, None if absent or unreadable (then: recreate)."""
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def ensure(root: Path, log=print) -> dict:
    """Create ``root`` if its recipe changed or it is missing; check it; returns the versions it sees.

    Raises :class:`BenchEnvError` naming the step that failed (e.g. no package index reachable).
    """
    root = Path(root)
    marker, recipe = root / _MARKER, _recipe()
    if _recorded(marker) == recipe and env_python(root).exists():
        return check(root)
    log(f"creating the benchmark environment {root} (peers: {', '.join(PEERS)}; torch from the project)")
    _run([sys.executable, "-m", "venv", "--clear", str(root)], "python -m venv", 300)
    py = env_python(root)
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   "locating the venv's site-packages", 60).strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in recipe["site_dirs"]]
    (Path(purelib) / "_stoprt_project.pth").write_text("\n".join(lines) + "\n")
    _run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", *PEERS, *IMPORT_DEPS],
         "pip install of the peers", 900)
    info = check(root)
    atomic.write_text(marker, json.dumps(recipe, indent=2))  # last: an interrupted creation is redone
    return info
