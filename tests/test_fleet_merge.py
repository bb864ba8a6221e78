"""Fleet learning in-process: aggregation, refusal of bad reports, the session's merge hook, the agent."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from stoprt.fleet.aggregate import Report, check_report, fedavg
from stoprt.runtime import models
from stoprt.runtime.stream.merge import (ACK_FILE, MERGE_FILE, REPORT_FILE, ROUND_KEY, FleetMerge, fleet_parameters,
                                         parameter_bounds, read_arrays, write_arrays)
from stoprt.runtime.stream.labels import LabelTrack
from stoprt.runtime.stream.session import SessionStats, StreamSession


def _net():
    torch.manual_seed(0)
    net = models.build_model("mlp", in_channels=2, size=4, classes=3, hidden=(5,))
    with torch.no_grad():
        net(torch.zeros(1, 2, 4, 4))
    return net


def _params(net, add=0.0):
    return {k: v.detach().numpy().copy() + np.float32(add) for k, v in fleet_parameters(net).items()}


def test_bounds_come_from_the_neurons():
    net = _net()
    bounds = parameter_bounds(net)
    lif = net[2]
    assert bounds["2.threshold"] == (lif.threshold_floor, float("inf"))
    assert bounds["2.leak"] == tuple(lif.leak_range)


def test_fedavg_weights_by_labelled_samples_and_damps():
    ref = {"w": np.zeros(3, np.float32)}
    reports = [Report("a", {"w": np.full(3, 1.0, np.float32)}, 1), Report("b", {"w": np.full(3, 4.0, np.float32)}, 3)]
    assert np.allclose(fedavg(ref, reports, {})["w"], 3.25)
    assert np.allclose(fedavg(ref, reports, {}, prox_mu=1.0)["w"], 3.25 / 2)
    assert fedavg(ref, [Report("a", ref, 0)], {}) is None  # no labelled sample: the global stays


def test_fedavg_weights_the_output_rows_by_class():
    ref = {"rows": np.zeros((3, 2), np.float32), "w": np.zeros(2, np.float32)}
    a = Report("a", {"rows": np.full((3, 2), 1.0, np.float32), "w": np.full(2, 1.0, np.float32)}, 4,
               class_labelled=np.array([3, 1]))  # counts of classes 0 and 1; none of class 2
    b = Report("b", {"rows": np.full((3, 2), 5.0, np.float32), "w": np.full(2, 5.0, np.float32)}, 4,
               class_labelled=np.array([0, 3, 1]))
    out = fedavg(ref, [a, b], {}, class_rows=["rows"])
    wa, wb = np.array([3, 1, 0]) + 4 / 3, np.array([0, 3, 1]) + 4 / 3  # class counts + an even share
    assert np.allclose(out["rows"], ((wa * 1.0 + wb * 5.0) / (wa + wb))[:, None])
    assert out["rows"][0, 0] < 3.0 < out["rows"][2, 0]  # plain weights give 3: row c leans to the node that learned c
    assert np.allclose(out["w"], 3.0)                    # the other layers: by labelled samples
    assert np.allclose(fedavg(ref, [a, b], {})["rows"], 3.0)  # head-weights "samples"
    c = Report("c", {"rows": np.full((3, 2), 5.0, np.float32), "w": np.full(2, 5.0, np.float32)}, 4)
    assert np.allclose(fedavg(ref, [a, c], {}, class_rows=["rows"])["rows"], 3.0)  # no counts: plain weights
    silent = Report("d", {"rows": np.full((3, 2), 9.0, np.float32), "w": np.full(2, 9.0, np.float32)}, 0)
    assert np.allclose(fedavg(ref, [a, silent], {}, class_rows=["rows"])["rows"][1], 1.0)


def test_class_rows_are_the_output_layers():
    from stoprt.fleet.config import FleetConfig
    from stoprt.fleet.model import initial_model
    params, _, rows = initial_model(FleetConfig(size=4))
    assert rows == ["3.weight", "3.bias"] and params["3.weight"].shape[0] == 10
    with pytest.raises(ValueError, match="head-weights"):
        FleetConfig(head_weights="rows")


def test_fedavg_keeps_thresholds_and_leaks_in_range():
    net = _net()
    bounds = parameter_bounds(net)
    ref = _params(net)
    low = {k: np.full_like(v, -5.0) for k, v in ref.items()}
    out = fedavg(ref, [Report("a", low, 2)], bounds)
    assert np.all(out["2.threshold"] == np.float32(bounds["2.threshold"][0]))
    assert np.all(out["2.leak"] == np.float32(bounds["2.leak"][0]))
    assert np.all(out["1.weight"] == -5.0)
    assert out["2.leak"].shape == ref["2.leak"].shape == ()


@pytest.mark.parametrize("change, needle", [
    (lambda p: p.update({"1.weight": p["1.weight"][:, :3]}), "'1.weight' has shape"),
    (lambda p: p["1.bias"].__setitem__(0, np.nan), "'1.bias' holds 1 NaN/Inf"),
    (lambda p: p.pop("3.bias"), "missing ['3.bias']"),
    (lambda p: p.update({"1.bias": p["1.bias"].astype(np.int32)}), "dtype int32"),
])
def test_bad_reports_are_refused_with_the_reason(change, needle):
    ref = _params(_net())
    bad = {k: v.copy() for k, v in ref.items()}
    change(bad)
    assert needle in check_report(bad, 5, ref)
    assert check_report(ref, 5, ref) is None
    assert "count" in check_report(ref, -1, ref)
    assert check_report(ref, 5, ref, [2, 0, 3], classes=3) is None
    assert "summing to 5" in check_report(ref, 5, ref, [2, 2], classes=3)
    assert "summing to 5" in check_report(ref, 5, ref, [6, -1], classes=3)
    assert "beyond the model's 3" in check_report(ref, 5, ref, [2, 0, 0, 3], classes=3)


def test_session_counts_labelled_samples_per_class():
    net = _net()
    track = LabelTrack()
    for k, label in enumerate([2, 0, 2]):
        track.add(100 * k, 100 * k + 100, label)
    session = StreamSession(net, None, labels=track)
    with torch.no_grad():
        for t in range(0, 300, 50):
            session.process(torch.zeros(1, 2, 4, 4), t, t + 50)
        session.finish()
    assert session.stats.labelled_by_class == [1, 0, 2] and session.stats.labelled_samples == 3


def _session(tmp_path):
    net = _net()
    return StreamSession(net, None, labels=LabelTrack(), checkpoint_dir=tmp_path)


def test_merge_replaces_first_then_adds_the_local_delta(tmp_path):
    session = _session(tmp_path)
    hook = FleetMerge(tmp_path)
    g1 = _params(session.net, 0.5)
    write_arrays(tmp_path / MERGE_FILE, {**g1, ROUND_KEY: np.array(1)})
    session.stats = SessionStats(labelled_samples=10, correct=4, labelled_by_class=[2, 8])
    hook(session)
    now = _params(session.net)
    assert np.allclose(now["1.weight"], g1["1.weight"])  # a session that never merged takes the global model
    assert json.loads((tmp_path / ACK_FILE).read_text()) == {"round": 1, "ok": True, "samples": 0, "labelled": 0}
    with torch.no_grad():  # local learning after the merge
        session.net[1].weight += 0.25
    session.stats = SessionStats(labelled_samples=16, correct=7, labelled_by_class=[4, 11, 1])
    g2 = _params(session.net, 0.0)
    g2["1.weight"] = g1["1.weight"] - 1.0
    g2["2.threshold"] = np.full_like(g2["2.threshold"], -3.0)  # below the floor: clamped by the neuron
    write_arrays(tmp_path / MERGE_FILE, {**g2, ROUND_KEY: np.array(2)})
    hook(session)
    now = _params(session.net)
    assert np.allclose(now["1.weight"], g1["1.weight"] - 1.0 + 0.25)  # global + what was learned since round 1
    assert np.all(now["2.threshold"] >= session.net[2].threshold_floor)
    state = torch.load(tmp_path / "session.pt", weights_only=True)["meta"]["fleet"]
    assert (state["round"], state["delta_labelled"], state["delta_correct"]) == (2, 6, 3)
    report = read_arrays(tmp_path / REPORT_FILE)  # what the agent sends: per class too
    assert report["__class_labelled__"].tolist() == [2, 3, 1] and int(report["__labelled__"]) == 6
    # a restarted session resumes the base from its checkpoint and does not apply round 2 again
    again = _session(tmp_path)
    saved = again.resume(tmp_path / "session.pt")
    hook2 = FleetMerge(tmp_path, saved)
    hook2(again)
    assert hook2.applied == 0 and np.allclose(_params(again.net)["1.weight"], now["1.weight"])


def test_merge_of_another_network_is_refused_and_learning_goes_on(tmp_path):
    session = _session(tmp_path)
    before = _params(session.net)
    wrong = {**before, "1.weight": np.zeros((2, 2), np.float32)}
    write_arrays(tmp_path / MERGE_FILE, {**wrong, ROUND_KEY: np.array(1)})
    FleetMerge(tmp_path)(session)
    ack = json.loads((tmp_path / ACK_FILE).read_text())
    assert ack["ok"] is False and "'1.weight'" in ack["error"]
    assert np.array_equal(_params(session.net)["1.weight"], before["1.weight"])
    (tmp_path / MERGE_FILE).write_bytes(b"PK\x03\x04 damaged")
    FleetMerge(tmp_path)(session)
    assert "damaged" in json.loads((tmp_path / ACK_FILE).read_text())["error"]


def test_agent_exchange_with_a_session_taking_the_round(tmp_path):
    from stoprt.fleet.agent import exchange
    session = _session(tmp_path)
    hook = FleetMerge(tmp_path)
    g = _params(session.net, 1.0)
    stop = threading.Event()

    def boundaries():  # the stream's sample boundaries, in another thread
        while not stop.is_set():
            hook(session)
            stop.wait(0.01)

    thread = threading.Thread(target=boundaries)
    thread.start()
    try:
        report = exchange(tmp_path, 1, g, timeout_s=10)
    finally:
        stop.set()
        thread.join()
    assert report.params is not None and np.allclose(report.params["1.weight"], g["1.weight"])
    assert report.labelled == 0 and report.class_labelled == []  # a first merge counts nothing
    assert not report.refused
    idle = exchange(tmp_path, 2, g, timeout_s=0.2)  # no session running: an empty report, never a hang
    assert idle.params is None and "did not take round 2" in idle.note


def test_the_agent_imports_no_torch():
    # a board's ClientApp process (one per round) loads the agent: torch there would cost seconds per
    # round and a second copy of torch's memory beside the stream's
    import subprocess
    import sys
    code = "import sys, stoprt.fleet.agent; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_cli_fleet_errors_are_one_line(tmp_path, capsys):
    from stoprt.cli import main
    assert main(["stream", "--source", "builtin:digits:2", "--learn", "--fleet", "--quiet"]) == 2
    assert "--fleet needs --learn and --checkpoint" in capsys.readouterr().err
    assert main(["fleet", "status", "--dir", str(tmp_path)]) == 2
    assert "no fleet status" in capsys.readouterr().err
    assert main(["fleet", "run", "--superlink", "127.0.0.1:1", "--work", str(tmp_path)]) == 2
    assert "uses TLS: pass --certs" in capsys.readouterr().err


def test_certificates_for_tls_and_node_authentication(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from stoprt.fleet.certs import make_certificates
    make_certificates(tmp_path, ["localhost", "10.0.0.5"], ["board1"])
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    load_ssh_private_key((tmp_path / "nodes" / "board1").read_bytes(), None)
    load_ssh_public_key((tmp_path / "nodes" / "board1.pub").read_bytes())
    assert (tmp_path / "nodes" / "board1").stat().st_mode & 0o077 == 0


class _Grid:
    """The calls of Flower's Grid that a round makes, answered at once by boards made up here."""

    def __init__(self, replies) -> None:
        self.replies, self.pushed = replies, {}

    def get_node_ids(self):
        return list(self.replies)

    def push_messages(self, messages):
        ids = [f"m{m.metadata.dst_node_id}" for m in messages]
        for i, m in zip(ids, messages):
            m.metadata.__dict__["_message_id"] = i  # as Flower's own grids give messages their ids
        self.pushed.update(zip(ids, messages))
        return ids

    def pull_messages(self, ids):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
        from stoprt.fleet.app import _arrays
        out = []
        for i in ids:
            msg = self.pushed.pop(i)
            params, labelled, by_class = self.replies[msg.metadata.dst_node_id]
            info = {"name": f"board{msg.metadata.dst_node_id}"}
            if isinstance(params, str):  # the board's session refused the global model: no report, the reason
                params, info["refused"] = None, params
            content = {"metrics": MetricRecord({"labelled": labelled, "class-labelled": by_class}),
                       "info": ConfigRecord(info)}
            if params is not None:
                content["report"] = _arrays(params)
            reply = Message(RecordDict(content), reply_to=msg)
            out.append(reply)
        return out


def test_a_round_refuses_bad_reports_by_name_and_aggregates_the_rest(monkeypatch, tmp_path):
    pytest.importorskip("flwr", reason="the fleet extra (flwr) is not installed")
    from flwr.supercore.task_identity import TaskIdentity
    from stoprt.fleet.app import run_round
    from stoprt.fleet.config import FleetConfig
    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # Messages are made inside a run
        monkeypatch.setattr(TaskIdentity, key, value)
    net = _net()
    g = _params(net)
    wrong = {**_params(net, 1.0), "1.weight": np.zeros((5, 3), np.float32)}
    nan = _params(net, 1.0)
    nan["3.weight"][0, 0] = np.inf
    grid = _Grid({1: (_params(net, 1.0), 2, [2, 0, 0]), 2: (_params(net, 4.0), 6, [0, 5, 1]),
                  3: (wrong, 4, [4]), 4: (nan, 4, [0, 0, 4]), 5: ("the global model's '1.weight' is (4, 3)", 0, [])})
    cfg = FleetConfig(min_nodes=2, round_timeout=5.0, straggler_wait=1.0, classes=3, status_dir=str(tmp_path))
    new, entry = run_round(grid, cfg, 1, g, parameter_bounds(net), ["3.weight", "3.bias"])
    assert sorted(entry["aggregated"]) == ["board1", "board2"] and entry["global_changed"]
    assert "'1.weight' has shape (5, 3)" in entry["refused"]["board3"]
    assert "'3.weight' holds 1 NaN/Inf" in entry["refused"]["board4"]
    assert "does not fit the fleet's model (the global model's '1.weight'" in entry["refused"]["board5"]
    assert not entry["missing"]
    assert np.allclose(new["1.bias"], g["1.bias"] + (2 * 1.0 + 6 * 4.0) / 8)   # by labelled samples
    w1, w2 = np.array([2, 0, 0]) + 2 / 3, np.array([0, 5, 1]) + 6 / 3  # row c: class c's samples + an even share
    assert np.allclose(new["3.bias"], g["3.bias"] + (w1 * 1.0 + w2 * 4.0) / (w1 + w2))


def test_digit_pool_gives_each_recording_its_own_events_and_a_share_lays_them_out_in_order(tmp_path):
    """The fleet's shares start from the built-in digits' recordings, one event array per recording
    (the built-in stream keeps them as one array with bounds); a share lays the picked ones end to end."""
    from stoprt.fleet import shares
    from stoprt.runtime.stream.builtin import DURATION_US, recordings

    events, labels = shares.digit_pool(DURATION_US["digits"], n=12)
    whole, bounds, same_labels = recordings("digits", 12, shares.SENSOR, DURATION_US["digits"], 0)
    assert len(events) == len(labels) == 12 and np.array_equal(labels, same_labels)
    for k, e in enumerate(events):
        assert np.array_equal(e, whole[bounds[k]:bounds[k + 1]]) and len(e) > 0
        assert e["t"].min() >= 0 and e["t"].max() <= DURATION_US["digits"]
    stream, track = shares.lay_out(events, labels, [3, 0, 7], gap_us=1000)
    assert len(stream) == len(events[3]) + len(events[0]) + len(events[7])
    assert [s.label for s in track.segments] == [labels[3], labels[0], labels[7]]
    assert np.all(np.diff(stream["t"]) >= 0)
