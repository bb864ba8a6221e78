"""stoprt's Flower app: the ServerApp (rounds and aggregation) and the ClientApp (the board's agent).

Both run on Flower's deployment engine: the SuperLink starts ``server_app`` when ``flwr run`` submits
the app (:mod:`.launch` writes its ``pyproject.toml``), each SuperNode starts ``client_app`` for each
message. Run config (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):
``rounds``, ``min-nodes`` (reports needed to aggregate a round), ``node-wait`` (seconds to wait for
``min-nodes`` nodes before a round), ``round-timeout`` (seconds a round waits for replies at most: a
dead node does not stall it), ``straggler-wait`` (seconds a round still waits for the others once
``min-nodes`` replied), ``round-every`` (seconds from one round's start to the next's at least;
0: back to back), ``ack-timeout`` (seconds a board's agent waits for its session), ``prox-mu``
(FedProx-style damping, 0: plain FedAvg), ``head-weights`` (``class``: the output layer's rows
weighted by each node's labelled samples of their class; ``samples``: like every other parameter, by
its labelled samples; see :mod:`.aggregate`), ``model``/``size``/``classes``/``seed`` (the network, built
as ``stoprt stream`` builds it) and ``status-dir`` (``status.json`` and ``global.pt``). Node config
(``flower-supernode --node-config``): ``checkpoint`` (the board's ``stoprt stream --checkpoint`` folder)
and ``name``.

A round (Flower message type ``train``): the server sends the global model to every connected node;
each agent hands it to its live session and replies with the session's report (parameters after the
merge, labelled samples learned since the previous merge, in all and per class, its stream accuracy
over them); the server validates each report (:func:`.aggregate.check_report`: refused ones are named
in the status, as is a board whose session refused the global model because its network differs),
averages the rest weighted by labelled samples (the output layer's rows by the samples of their class),
clamps thresholds and leaks, and saves the new global model.
Round 1 sends the server's freshly built model, so every board starts from the same one (a board that
joins later starts from the global model of its first round).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import import_flwr
from .aggregate import Report, check_report, fedavg
from .config import FleetConfig

import_flwr()
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

_log = logging.getLogger("stoprt.fleet")
server_app = ServerApp()
client_app = ClientApp()


def _arrays(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in params.items()})


def _nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def _wait_for_nodes(grid: Grid, count: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.5)


def _send_and_collect(grid: Grid, messages: list[Message], timeout: float, quorum: int, straggler_s: float,
                      poll_s: float = 0.5) -> tuple[list[Message], dict[str, int]]:
    """Push, then pull the replies until all came, ``timeout`` passed, or ``straggler_s`` passed since
    the ``quorum``-th reply (a dead node stays listed by the SuperLink until its heartbeat expires, a
    minute or so: without this every round until then would last ``timeout``). Grid.send_and_receive
    polls every 3 s, which would add up to 3 s to every round. Also returns message id -> node id
    (an error reply made by the SuperLink for a dead node does not carry that node as its source)."""
    ids = list(grid.push_messages(messages)) if messages else []
    to_node = {i: m.metadata.dst_node_id for i, m in zip(ids, messages)}
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if got and len(replies) >= quorum:
            deadline = min(deadline, time.monotonic() + straggler_s)
        if pending:
            time.sleep(poll_s)
    return replies, to_node


def _read_reply(reply: Message, node_id: int, reference: dict[str, np.ndarray], classes: int) -> tuple[str, dict]:
    """``(name, entry)`` for the status; ``entry["report"]`` is a :class:`Report` when it can be aggregated."""
    if reply.has_error():
        return str(node_id), {"node_id": node_id, "status": f"error: {reply.error.reason}", "received": 0, "labelled": 0}
    content = reply.content
    info = content.config_records.get("info", ConfigRecord())
    name = str(info.get("name") or node_id)
    metrics = content.metric_records.get("metrics", MetricRecord())
    entry = {"node_id": node_id, "labelled": int(metrics.get("labelled", 0)), "samples": metrics.get("samples"),
             "accuracy": metrics.get("accuracy"), "received": 0, "note": info.get("note", "")}
    record = content.array_records.get("report")
    if record is None and info.get("refused"):
        # the board runs another network than the fleet's (its session could not take the global model):
        # refused and named like a report of the wrong shape, not counted as a missing node
        return name, {**entry, "status": f"refused: its network does not fit the fleet's model ({info['refused']})",
                      "labelled": 0}
    if record is None:
        entry["status"] = "no report" + (f" ({entry['note']})" if entry["note"] else "")
        entry["labelled"] = 0
        return name, entry
    entry["received"] = _nbytes(record)
    try:
        params = {k: a.numpy() for k, a in record.items()}
    except Exception as err:  # a payload whose bytes do not match its shape and dtype
        return name, {**entry, "status": f"refused: unreadable arrays ({type(err).__name__}: {err})"}
    by_class = metrics.get("class-labelled")
    problem = check_report(params, metrics.get("labelled", 0), reference, by_class, classes)
    if problem:
        return name, {**entry, "status": f"refused: {problem}", "labelled": 0}
    entry["report"] = Report(name, params, entry["labelled"], entry["accuracy"],
                             None if by_class is None else np.asarray(by_class, np.int64))
    entry["status"] = "ok"
    return name, entry


def run_round(grid: Grid, cfg: FleetConfig, rnd: int, params: dict[str, np.ndarray], bounds: dict,
              class_rows: list[str]) -> tuple[dict, dict]:
    """One round; returns ``(new global parameters, status entry)``."""
    nodes = _wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait)
    start = time.monotonic()
    record = _arrays(params)
    sent = _nbytes(record)
    messages = [Message(RecordDict({"global": record, "config": ConfigRecord({"round": rnd, "ack-timeout": cfg.ack_timeout})}),
                        dst_node_id=n, message_type=MessageType.TRAIN, ttl=max(cfg.round_timeout, 1.0) + 30.0)
                for n in nodes]
    replies, to_node = _send_and_collect(grid, messages, cfg.round_timeout, cfg.min_nodes, cfg.straggler_wait)
    per_node: dict[str, dict] = {}
    for reply in replies:
        node_id = to_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        name, entry = _read_reply(reply, node_id, params, cfg.classes)
        per_node[name] = {**entry, "sent": sent}
    answered = {e["node_id"] for e in per_node.values()}
    for n in nodes:
        if n not in answered:
            per_node[str(n)] = {"node_id": n, "status": "no reply in time", "sent": sent,
                                "received": 0, "labelled": 0}
    reports = [e.pop("report") for e in per_node.values() if "report" in e]
    rows = class_rows if cfg.head_weights == "class" else []
    new = fedavg(params, reports, bounds, cfg.prox_mu, rows) if len(reports) >= cfg.min_nodes else None
    entry = {"round": rnd, "seconds": time.monotonic() - start, "nodes_asked": len(nodes),
             "aggregated": [r.node for r in reports if r.labelled] if new is not None else [],
             "refused": {k: e["status"][len("refused: "):] for k, e in per_node.items() if e["status"].startswith("refused")},
             "missing": [k for k, e in per_node.items() if not e["status"].startswith(("ok", "refused"))],
             "global_changed": new is not None,
             "bytes_sent": sent * len(nodes), "bytes_received": sum(e["received"] for e in per_node.values()),
             "per_node": per_node}
    for name, why in entry["refused"].items():
        _log.warning("stoprt fleet: round %d: refused the report of node %s: %s", rnd, name, why)
    return (new if new is not None else params), entry


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from .model import initial_model, save_global  # torch and the model zoo: the server only
    from .status import FleetStatus
    cfg = FleetConfig.from_run_config(dict(context.run_config))
    folder = Path(cfg.status_dir)
    params, bounds, class_rows = initial_model(cfg)
    status = FleetStatus(folder, asdict(cfg))
    save_global(folder, 0, params, cfg)
    for rnd in range(1, cfg.rounds + 1):
        if rnd > 1:  # rounds start at most every round-every seconds: each carries more samples per board
            time.sleep(max(0.0, started + cfg.round_every - time.monotonic()))
        started = time.monotonic()
        params, entry = run_round(grid, cfg, rnd, params, bounds, class_rows)
        save_global(folder, rnd, params, cfg)
        status.add_round(entry)
        print(f"stoprt fleet: round {rnd}: {len(entry['aggregated'])} aggregated, {len(entry['refused'])} refused, "
              f"{len(entry['missing'])} missing, {entry['seconds']:.1f} s", flush=True)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    from .agent import exchange
    cfg = msg.content.config_records["config"]
    rnd = int(cfg["round"])
    checkpoint = context.node_config.get("checkpoint")
    if not checkpoint:
        raise ValueError("this SuperNode has no node config `checkpoint` (the board's stream --checkpoint folder)")
    incoming = {k: a.numpy() for k, a in msg.content.array_records["global"].items()}
    report = exchange(checkpoint, rnd, incoming, timeout_s=float(cfg.get("ack-timeout", 10.0)))
    metrics = {"labelled": report.labelled, "correct": report.correct}
    if report.samples is not None:
        metrics["samples"] = report.samples
    if report.accuracy is not None:
        metrics["accuracy"] = report.accuracy
    if report.class_labelled:
        metrics["class-labelled"] = report.class_labelled
    content = RecordDict({"metrics": MetricRecord(metrics),
                          "info": ConfigRecord({"name": str(context.node_config.get("name", "")), "note": report.note,
                                                        "refused": report.refused})})
    if report.params is not None:
        content["report"] = _arrays(report.params)
    return Message(content, reply_to=msg)
