"""A whole fleet on one machine, as real processes: one SuperLink, a SuperNode and a ``stoprt stream
--learn --fleet`` per board, and ``flwr run`` of stoprt's app (tests, the benchmark, trying it out).

Without TLS (``--insecure``), on free localhost ports, in one work folder; every process is started in
its own process group and logs to ``WORK/logs/``; :meth:`LocalFleet.close` ends the ones still running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .launch import flower_env, run_command, superlink_command, supernode_command, write_app, write_flower_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFleet:
    """Boards are named ``node0``, ``node1``, ...; each streams ``sources[i]`` (``(recording, labels CSV)``)."""

    def __init__(self, work: str | os.PathLike, sources: list[tuple[Path, Path]], stream_args: list[str]) -> None:
        self.work = Path(work).resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sources, self.stream_args = sources, stream_args
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.home = self.work / "flwr-home"
        self.env = flower_env(self.home)
        self.procs: dict[str, subprocess.Popen] = {}

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
        self._start("superlink", superlink_command(self.port, "127.0.0.1", insecure=True, auth=False))

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

    def start_node(self, i: int) -> None:
        self.checkpoint(i).mkdir(parents=True, exist_ok=True)
        self._start(f"supernode{i}", supernode_command(self.superlink, self.checkpoint(i), f"node{i}", free_port(),
                                                       insecure=True))

    def start_stream(self, i: int, resume: bool = False) -> None:
        raw, csv = (Path(p).resolve() for p in self.sources[i])
        cmd = [sys.executable, "-m", "stoprt.cli", "stream", "--source", str(raw), "--labels", str(csv), "--learn",
               "--fleet", "--checkpoint", str(self.checkpoint(i)), "--quiet", "--json",
               str(self.work / f"stream{i}.json"), *self.stream_args] + (["--resume"] if resume else [])
        self._start(f"stream{i}", cmd)

    def start_run(self, run_config: dict) -> subprocess.Popen:
        """``flwr run`` with ``run_config``; its status folder is ``WORK/status``."""
        app = write_app(self.work / "app", {**run_config, "status-dir": str(self.work / "status")})
        write_flower_config(self.home, self.superlink, insecure=True)
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

    def close(self) -> None:
        """SIGTERM each running process group (streams checkpoint), then SIGKILL what is left."""
        for key in self.procs:
            self.signal(key, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for key, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.signal(key, signal.SIGKILL)
                proc.wait(5)

    def __enter__(self) -> "LocalFleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
