"""A real fleet on localhost: one SuperLink, three SuperNodes, three ``stoprt stream --learn --fleet``
processes, each on a non-IID share of the built-in digits, and ``flwr run`` of stoprt's app.

One run checks: the rounds complete; a node SIGKILLed (its SuperNode and its stream) that the SuperLink
still lists does not stall the round that waits for it; restarted, it resumes from its checkpoint and
takes the global model; the global model beats every board's local-only model over all ten classes
after as many samples as it learned. Another: a board whose server cannot be reached learns alone.
Another runs secure (TLS, node authentication): only registered SuperNodes that trust the fleet's CA
get in, and a board of another network is refused by name while the others aggregate.
Hard timeouts everywhere; every process is ended at the end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the fleet extra (flwr) is not installed")

from stoprt.export.loading import load_network  # noqa: E402
from stoprt.fleet import shares  # noqa: E402
from stoprt.fleet.local import LocalFleet  # noqa: E402
from stoprt.fleet.model import load_global  # noqa: E402

GROUPS = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
DURATION, GAP, DT = 300_000, 300_000, 30_000


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _rounds(work):
    try:
        return json.loads((work / "status" / "status.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


pytestmark = pytest.mark.slow  # about 4 minutes on a loaded 2-core machine (real processes, real time)
# 6 aggregations (round 1 hands every board the same model) of ~30 labelled samples per board (a round
# every 18 s); 280 recordings are ~175 s of stream per board, longer than the rounds
ROUNDS, SHARE, EVERY = 7, 280, 18.0


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    """One fleet run shared by the tests below: ``(work folder, status rounds, picks, pool)``."""
    tmp_path = tmp_path_factory.mktemp("fleet")
    events, labels = shares.digit_pool(DURATION)
    picks = [shares.share_indices(labels, g, SHARE, 0.15, seed=i) for i, g in enumerate(GROUPS)]
    sources = [shares.write_share(tmp_path, f"share{i}", events, labels, p, GAP) for i, p in enumerate(picks)]
    stream_args = ["--realtime", "--threads", "1", "--checkpoint-every", "0"]
    with LocalFleet(tmp_path, sources, stream_args) as fleet:
        fleet.start_link()
        fleet.wait_for_link()
        for i in range(3):
            fleet.start_node(i)
            fleet.start_stream(i)
        fleet.start_run({"rounds": ROUNDS, "min-nodes": 2, "node-wait": 60.0, "round-timeout": 60.0,
                         "straggler-wait": 5.0, "round-every": EVERY, "ack-timeout": 20.0, "size": 16})
        _wait(lambda: len(_rounds(tmp_path)) >= 1, 120, "round 1")
        # kill board 2 (agent and stream) before round 2: the SuperLink still lists it (its heartbeat
        # has not expired), so round 2 sends it the model and waits for a reply that never comes
        for key in ("stream2", "supernode2"):
            fleet.signal(key, signal.SIGKILL)
        fleet.wait("supernode2", 10)
        _wait(lambda: len(_rounds(tmp_path)) >= 2, 90, "round 2 without the dead node")
        fleet.start_stream(2, resume=True)  # the board comes back for the later rounds
        fleet.start_node(2)
        assert fleet.wait("run", 60 * ROUNDS) == 0, fleet.log("run")[-3000:]
        rounds = _rounds(tmp_path)
        for i in (0, 1):
            fleet.signal(f"stream{i}", signal.SIGTERM)
    assert len(rounds) == ROUNDS, fleet.log("run")[-3000:]
    return tmp_path, rounds, picks, (events, labels), fleet


def test_rounds_survive_a_killed_node_that_restarts(fleet_run):
    tmp_path, rounds, _, _, fleet = fleet_run
    r1, r2, *later = rounds
    assert all(e["status"] == "ok" for e in r1["per_node"].values()) and len(r1["per_node"]) == 3
    assert r2["global_changed"] and sorted(r2["aggregated"]) == ["node0", "node1"], r2
    assert all(r["global_changed"] for r in later) and "node2" in later[-1]["aggregated"], later
    assert "resumed at step" in fleet.log("stream2")
    node2 = torch.load(tmp_path / "node2" / "session.pt", weights_only=True)
    assert node2["meta"]["fleet"]["round"] == ROUNDS  # the restarted board took the global model
    assert r1["bytes_sent"] > 0 and all(e["received"] > 0 for e in later[-1]["per_node"].values() if e["status"] == "ok")


def test_global_model_beats_every_board_alone(fleet_run):
    tmp_path, rounds, picks, (events, labels), _ = fleet_run
    # held-out accuracy over all ten classes: the global model against each board alone
    n = len(labels)
    held, track = shares.lay_out(events, labels, range(n - shares.HELD_OUT, n), GAP)
    held_steps = shares.stream_steps(held, 16, DT)
    net, rnd = load_global(tmp_path / "status" / "global.pt")
    fleet_acc = shares.evaluate(net, held_steps, track)
    assert rnd == ROUNDS
    for i, pick in enumerate(picks):
        learned = sum(r["per_node"].get(f"node{i}", {}).get("labelled", 0) for r in rounds)
        share, share_track = shares.lay_out(events, labels, pick, GAP)
        torch.manual_seed(0)
        alone = load_network("mlp", {"in_channels": 2, "size": 16, "classes": 10}).net
        shares.learn_alone(alone, shares.stream_steps(share, 16, DT), share_track, max(learned, 1), lr=1e-3)
        alone_acc = shares.evaluate(alone, held_steps, track)
        print(f"node{i}: {learned} labelled samples, alone {alone_acc:.3f}, fleet {fleet_acc:.3f}")
        assert fleet_acc > alone_acc, (i, learned, alone_acc, fleet_acc)


def test_a_board_whose_server_is_unreachable_learns_alone(tmp_path):
    """No SuperLink listens at the fleet's address: the stream learns its whole share on its own, in
    about the share's duration (it never waits on the network), while its SuperNode keeps retrying
    with backoff."""
    events, labels = shares.digit_pool(DURATION)
    pick = shares.share_indices(labels, GROUPS[0], 20, 0.15, seed=0)
    source = shares.write_share(tmp_path, "share0", events, labels, pick, GAP)
    with LocalFleet(tmp_path, [source], ["--realtime", "--threads", "1", "--checkpoint-every", "0"]) as fleet:
        fleet.start_node(0)  # pointed at fleet.superlink, where nothing was started
        fleet.start_stream(0)
        assert fleet.wait("stream0", 120) == 0, fleet.log("stream0")[-2000:]
        assert fleet.procs["supernode0"].poll() is None, fleet.log("supernode0")[-2000:]  # still trying
    summary = json.loads((tmp_path / "stream0.json").read_text())
    assert summary["labelled_samples"] == 20 and summary["updates"] == 20
    duration_s = len(pick) * (DURATION + GAP) / 1e6  # paced in real time (a loaded machine drops steps instead)
    assert summary["seconds"] < 2 * duration_s and not summary["interrupted"], summary
    assert fleet.log("supernode0").count("retrying in") >= 2
    assert not (tmp_path / "node0" / "merged.json").exists()  # no round ever reached it


def test_a_secure_fleet_admits_only_registered_nodes_that_trust_its_ca_and_refuses_a_board_of_another_model(tmp_path):
    """TLS and node authentication as a real fleet runs them: certificates from ``make_certificates``,
    boards registered as ``stoprt fleet register`` does. Boards 0 and 1 learn the fleet's model; board
    2 (registered, trusted) streams a network of another input size, so its session cannot take the
    global model: each round refuses and names it, and aggregates the other two. Two more SuperNodes
    never get in: one signs with a key never registered, one trusts another CA (its key is registered).
    ``stoprt fleet register`` run again over known, missing and new keys reports each and exits 1."""
    from stoprt.fleet.certs import make_certificates
    from stoprt.fleet.status import format_status, read_status

    events, labels = shares.digit_pool(DURATION)
    picks = [shares.share_indices(labels, g, 60, 0.15, seed=i) for i, g in enumerate(GROUPS)]
    sources = [shares.write_share(tmp_path, f"share{i}", events, labels, p, GAP) for i, p in enumerate(picks)]
    outsider = tmp_path / "outsider"  # another CA, and keys of its own
    make_certificates(outsider, ["127.0.0.1"], ["stranger", "foreign", "late"])
    rounds = 2
    with LocalFleet(tmp_path / "fleet", sources, ["--realtime", "--threads", "1", "--checkpoint-every", "0"],
                    secure=True) as fleet:
        fleet.start_link()
        fleet.wait_for_link()
        for i in range(3):
            assert fleet.register(i).startswith("registered as SuperNode "), i
        fleet.register(4, outsider / "nodes" / "foreign.pub")
        # the command, as an operator re-runs it over the fleet's keys: a known key is no error, a
        # missing key file is named, and the keys after it are still tried
        again = subprocess.run([sys.executable, "-m", "stoprt.cli", "fleet", "register",
                                str(fleet.certs / "nodes" / "node0.pub"), str(tmp_path / "nodes" / "absent.pub"),
                                str(outsider / "nodes" / "late.pub"), "--superlink", fleet.superlink,
                                "--certs", str(fleet.certs), "--work", str(tmp_path / "cli")],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 1, again
        assert "node0.pub: already registered" in again.stdout, again.stdout
        assert "absent.pub" in again.stderr and "does not exist" in again.stderr, again.stderr
        assert "late.pub: registered as SuperNode" in again.stdout, again.stdout
        for i in range(3):
            fleet.start_node(i)
            fleet.start_stream(i, extra=["--size", "8"] if i == 2 else [])
        fleet.start_node(3, key=outsider / "nodes" / "stranger")                          # not registered
        fleet.start_node(4, certs=outsider, key=outsider / "nodes" / "foreign")          # another CA
        _wait(lambda: fleet.log("superlink").count("Activated node_id") >= 3, 120, "three SuperNodes online")
        fleet.start_run({"rounds": rounds, "min-nodes": 2, "node-wait": 60.0, "round-timeout": 60.0,
                         "straggler-wait": 10.0, "round-every": 10.0, "ack-timeout": 30.0, "size": 16})
        assert fleet.wait("run", 240) == 0, fleet.log("run")[-3000:]
        for key in ("supernode3", "supernode4"):
            assert fleet.wait(key, 60) != 0, fleet.log(key)[-2000:]  # they gave up; they never took part
        link, stranger, foreign = fleet.log("superlink"), fleet.log("supernode3"), fleet.log("supernode4")
        assert fleet.log("run").count("refused the report of node node2: its network does not fit") == rounds
    assert link.count("Activated node_id") == 3, link[-3000:]  # boards 0-2 only
    assert "No SuperNode found with the given public key" in link and "Failed to activate SuperNode" in stranger
    assert "CERTIFICATE_VERIFY_FAILED" in foreign and "Activated" not in foreign
    status = read_status(fleet.work / "status")
    assert len(status["rounds"]) == rounds and set(status["nodes"]) == {"node0", "node1", "node2"}, status["nodes"]
    for r in status["rounds"]:
        assert sorted(r["per_node"]) == ["node0", "node1", "node2"] and not r["missing"], r
        assert list(r["refused"]) == ["node2"], r
        # names the misfit: the first layer takes 8x8x2 inputs on board 2, 16x16x2 in the fleet's model
        assert "does not fit the fleet's model" in r["refused"]["node2"], r["refused"]
        assert "is (256, 512), this network's is (256, 128)" in r["refused"]["node2"], r["refused"]
    last = status["rounds"][-1]  # round 1 hands out the first model (nothing learned yet to average)
    assert last["global_changed"] and sorted(last["aggregated"]) == ["node0", "node1"], last
    assert "refused node2: its network does not fit" in format_status(status)
    for i in (0, 1):  # the good boards took the aggregate of the last round
        assert torch.load(fleet.checkpoint(i) / "session.pt", weights_only=True)["meta"]["fleet"]["round"] == rounds
    assert json.loads((fleet.checkpoint(2) / "merged.json").read_text())["ok"] is False
