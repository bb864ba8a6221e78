"""Command lines and files for Flower's deployment engine: the SuperLink, a board's SuperNode, and
``flwr run`` of stoprt's app.

Flower 1.42 serves the SuperLink's Fleet, Control and Runtime APIs on one HTTP port (``--port``,
default 9093 here). A SuperNode takes the SuperLink's ``host:port`` and its own Runtime API port
(``--port``, default 9094; each SuperNode on one machine needs its own). ``flwr run`` reads the
SuperLink connection from the Flower configuration (``$FLWR_HOME/config.toml``; in Flower 1.42 this
replaces the ``[tool.flwr.federations]`` table of the app's ``pyproject.toml``); stoprt writes both
the app folder and that configuration into a work folder, so the user's own ``~/.flwr`` is untouched.

TLS is on unless ``insecure``: the SuperLink takes ``server.pem``/``server.key``/``ca.crt`` from a
:mod:`.certs` folder; SuperNodes and ``flwr run`` verify it with ``ca.crt``. Node authentication
(``auth``) makes the SuperLink accept only registered SuperNodes, each signing with its
``nodes/NAME`` key.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..runtime.atomic import write_text

DEFAULT_PORT, NODE_PORT = 9093, 9094
CONNECTION = "stoprt-fleet"


def flower_bin(name: str) -> str:
    """The path of one of Flower's programs (beside this Python, else on PATH)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ImportError(f"{name} not found: pip install 'stoprt[fleet]' (flwr>=1.42) into this environment")
    return found


def flower_env(flwr_home: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment for Flower's programs: this Python's bin first on PATH (the SuperLink starts
    ``flower-superexec`` by name), ``FLWR_HOME`` when given."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _certs(certs: str | os.PathLike | None, insecure: bool, what: str) -> Path | None:
    if insecure:
        return None
    if certs is None:
        raise ValueError(f"{what} uses TLS: pass --certs DIR (made by `stoprt fleet certs`), or --insecure "
                         "for a test on one machine")
    folder = Path(certs)
    if not (folder / "ca.crt").is_file():
        raise ValueError(f"{folder / 'ca.crt'} not found (make the certificates with `stoprt fleet certs`)")
    return folder


def superlink_command(port: int = DEFAULT_PORT, host: str = "0.0.0.0", certs: str | os.PathLike | None = None,
                      insecure: bool = False, auth: bool = True, database: str | None = None) -> list[str]:
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    folder = _certs(certs, insecure, "the SuperLink")
    if folder is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(folder / "ca.crt"), "--ssl-certfile", str(folder / "server.pem"),
                "--ssl-keyfile", str(folder / "server.key")]
    if auth and not insecure:
        cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    return cmd


def supernode_command(superlink: str, checkpoint: str | os.PathLike, name: str = "", port: int = NODE_PORT,
                      certs: str | os.PathLike | None = None, key: str | os.PathLike | None = None,
                      insecure: bool = False) -> list[str]:
    """A board's SuperNode; ``checkpoint`` is its ``stoprt stream --checkpoint`` folder."""
    checkpoint = Path(checkpoint).resolve()
    config = f'checkpoint="{checkpoint}"' + (f' name="{name}"' if name else "")
    if '"' in str(checkpoint) + name or " " in str(checkpoint):
        raise ValueError("the checkpoint folder and node name may not contain quotes or spaces (Flower's --node-config)")
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", config]
    folder = _certs(certs, insecure, "the SuperNode")
    if folder is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(folder / "ca.crt")]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
    return cmd


APP_TOML = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "stoprt-fleet"
version = "1.0.0"
description = "stoprt fleet learning: STOP on every board, merged by Flower"
license = "Apache-2.0"
dependencies = []   # stoprt[fleet] is installed on the server and on every board

[tool.flwr.app]
publisher = "stoprt"

[tool.flwr.app.components]
serverapp = "stoprt.fleet.app:server_app"
clientapp = "stoprt.fleet.app:client_app"

[tool.flwr.app.config]
{config}
"""


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(folder: str | os.PathLike, run_config: dict) -> Path:
    """The Flower app folder (only its ``pyproject.toml``: the code is the installed stoprt)."""
    from .config import FleetConfig
    FleetConfig.from_run_config(run_config)  # unknown keys fail here, not inside the SuperLink
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in run_config.items())
    write_text(Path(folder) / "pyproject.toml", APP_TOML.format(config=lines))
    return Path(folder)


def write_flower_config(flwr_home: str | os.PathLike, superlink: str, certs: str | os.PathLike | None = None,
                        insecure: bool = False) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, the default."""
    folder = _certs(certs, insecure, "flwr run")
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{superlink}"']
    lines.append("insecure = true" if folder is None else f'root-certificates = "{(folder / "ca.crt").resolve()}"')
    return write_text(Path(flwr_home) / "config.toml", "\n".join(lines) + "\n")


def register_command(public_key: str | os.PathLike) -> list[str]:
    """``flwr supernode register`` of one board's public key (``nodes/NAME.pub``) with the configured
    SuperLink (a SuperLink with node authentication accepts only SuperNodes registered this way; it
    refuses to let SuperNodes register themselves)."""
    return [flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION]


def register_key(public_key: str | os.PathLike, env: dict[str, str], cwd: str | os.PathLike | None = None,
                 timeout_s: float = 120) -> tuple[bool, str]:
    """Register one board's public key (:func:`register_command`, with the connection in ``env``'s
    ``FLWR_HOME``): ``(True, "registered as SuperNode ID")``, ``(True, "already registered")`` (a key
    the SuperLink knows: registering a fleet's keys again after adding a board is not an error), or
    ``(False, Flower's error in one line)`` (SuperLink unreachable, no such key file, ...)."""
    done = subprocess.run(register_command(public_key), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)
    said = " ".join(line.strip(" \u2502\u256d\u256e\u2570\u256f\u2500") for line in
                    (done.stdout + done.stderr).splitlines() if not line.startswith("Using SuperLink"))
    said = " ".join(said.split())
    if done.returncode == 0:
        node = re.search(r"SuperNode (\d+) registered", said)
        return True, f"registered as SuperNode {node.group(1)}" if node else f"registered ({said})"
    if "already in use" in said:  # Flower's words for a public key it registered before
        return True, "already registered"
    return False, said or f"flwr supernode register exited {done.returncode}"


def run_command(app_folder: str | os.PathLike) -> list[str]:
    """``flwr run`` of the app folder on the configured connection, following its log to the end."""
    return [flower_bin("flwr"), "run", str(app_folder), CONNECTION, "--stream"]
