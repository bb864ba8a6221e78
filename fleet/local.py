"""A whole fleet on one machine, as real processes: one SuperLink, a SuperNode and a ``stoprt stream
--learn --fleet`` per board, and ``flwr run`` of stoprt's app (tests, the benchmark, trying it out).

Without TLS (``--insecure``) by default; ``secure=True`` runs it as a real fleet runs: TLS with
certificates made by :func:`.certs.make_certificates` in ``WORK/certs`` (a key pair per board) and node
authentication (each board registered with :meth:`LocalFleet.register`, as ``stoprt fleet register``
does). On free localhost ports, in one work folder; every process is started in its own process group
and logs to ``WORK/logs/``; :meth:`LocalFleet.close` ends the ones still running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .certs import make_certificates
from .launch import (flower_env, register_key, run_command, superlink_command, supernode_command, write_app,
                     write_flower_config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFleet:
    """Boards are named ``node0``, ``node1``, ...; each streams ``sources[i]`` (``(recording, labels CSV)``).
    ``secure``: TLS and node authentication, board ``i``'s key pair in ``WORK/certs/nodes/node{i}``."""

    def __init__(self, work: str | os.PathLike, sources: list[tuple[Path, Path]], stream_args: list[str],
                 secure: bool = False) -> None:
        self.work = Path(work).resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sources, self.stream_args = sources, stream_args
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.home = self.work / "flwr-home"
        self.env = flower_env(self.home)
        self.procs: dict[str, subprocess.Popen] = {}
        self.certs = self.work / "certs" if secure else None
        if self.certs is not None:
            make_certificates(self.certs, ["127.0.0.1", "localhost"], [f"node{i}" for i in range(len(sources))])
        # the connection `flwr run` and `flwr supernode register` use
        write_flower_config(self.home, self.superlink, self.certs, insecure=not secure)

    @property
    def secure(self) -> bool:
        return self.certs is not None

    def checkpoint(self, i: int) -> Path:
        return self.work / f"node{i}"

    def _start(self, key: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{key}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                start_new_session=True)
        log.close()
        self.procs[key] = proc
        return proc

    def start_link(self) -> None:
        self._start("superlink", superlink_command(self.port, "127.0.0.1", self.certs, insecure=not self.secure,
                                                   auth=self.secure))

    def wait_for_link(self, timeout: float = 60.0) -> None:
        """Until the SuperLink accepts connections (it starts in a few seconds; more on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.procs["superlink"].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the SuperLink did not start:\n{self.log('superlink')[-2000:]}") from None
                time.sleep(0.2)

    def register(self, i: int, public_key: str | os.PathLike | None = None) -> str:
        """Register board ``i``'s public key (default ``WORK/certs/nodes/node{i}.pub``) with the running
        SuperLink, as ``stoprt fleet register`` does; returns the outcome (:func:`.launch.register_key`)."""
        key = public_key if public_key is not None else self.certs / "nodes" / f"node{i}.pub"
        ok, said = register_key(key, self.env, self.work)
        if not ok:
            raise RuntimeError(f"registering {key} failed: {said}")
        return said

    def start_node(self, i: int, certs: str | os.PathLike | None = None, key: str | os.PathLike | None = None) -> None:
        """Board ``i``'s SuperNode; in a secure fleet it trusts ``certs`` (default the fleet's) and signs
        with ``key`` (default its own), so a test can give it a foreign CA or an unregistered key."""
        self.checkpoint(i).mkdir(parents=True, exist_ok=True)
        if self.secure:
            certs = certs if certs is not None else self.certs
            key = key if key is not None else self.certs / "nodes" / f"node{i}"
        self._start(f"supernode{i}", supernode_command(self.superlink, self.checkpoint(i), f"node{i}", free_port(),
                                                       certs, key, insecure=not self.secure))

    def start_stream(self, i: int, resume: bool = False, extra: Sequence[str] = ()) -> None:
        """Board ``i``'s ``stoprt stream --learn --fleet``, with the fleet's stream arguments and ``extra``."""
        raw, csv = (Path(p).resolve() for p in self.sources[i])
        cmd = [sys.executable, "-m", "stoprt.cli", "stream", "--source", str(raw), "--labels", str(csv), "--learn",
               "--fleet", "--checkpoint", str(self.checkpoint(i)), "--quiet", "--json",
               str(self.work / f"stream{i}.json"), *self.stream_args, *extra] + (["--resume"] if resume else [])
        self._start(f"stream{i}", cmd)

    def start_run(self, run_config: dict) -> subprocess.Popen:
        """``flwr run`` with ``run_config``; its status folder is ``WORK/status``."""
        app = write_app(self.work / "app", {**run_config, "status-dir": str(self.work / "status")})
        return self._start("run", run_command(app))

    def signal(self, key: str, sig: int) -> None:
        proc = self.procs[key]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)

    def wait(self, key: str, timeout: float) -> int:
        return self.procs[key].wait(timeout)

    def log(self, key: str) -> str:
        path = self.logs / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _signal_group(self, key: str, sig: int) -> None:
        """Signal the whole group, also after its leader exited: a SuperNode that gave up (refused by the
        SuperLink) leaves its ``flower-superexec`` child running in the group."""
        try:
            os.killpg(self.procs[key].pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """SIGTERM each process group (streams checkpoint), then SIGKILL what is left."""
        for key in self.procs:
            self._signal_group(key, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for key, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(key, signal.SIGKILL)
            proc.wait(5)

    def __enter__(self) -> "LocalFleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
