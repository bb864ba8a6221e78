"""Shared test fixtures."""

import subprocess

import pytest
import torch

from stoprt.cli import main


@pytest.fixture
def float64():
    """Run a test in double precision (exactness checks); the default dtype is restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def run_cli(capsys):
    """Run ``stoprt ARGV`` in this process, as a shell would see it: exit code, stdout and stderr in a
    ``CompletedProcess``. In-process calls skip a torch start-up (seconds) per call; the tests that
    need what only a real process shows (signals, RSS, the entry point) run one."""
    def run(*argv: str) -> subprocess.CompletedProcess:
        capsys.readouterr()  # only this call's output
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # the parser exits by SystemExit
            rc = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), rc, out.out, out.err)
    return run
