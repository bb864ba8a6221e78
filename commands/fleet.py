"""``stoprt fleet``: many boards learning in situ, combined through Flower (optional extra ``fleet``).

Subcommands (see :mod:`stoprt.fleet` and the README's fleet section):

* ``certs``: a CA, the SuperLink's TLS certificate and one authentication key pair per board;
* ``link``: the SuperLink (the server), TLS and node authentication on unless ``--insecure``;
* ``register``: register boards' public keys with the SuperLink (node authentication);
* ``node``: a board's SuperNode, beside its ``stoprt stream --learn --fleet --checkpoint DIR``;
* ``run``: submit stoprt's Flower app (the rounds) to the SuperLink and follow it to the end;
* ``status``: the rounds, the nodes and the accuracy each node reported.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from ..cli_args import nonnegative_float, nonnegative_int, positive_float, positive_int
from ..fleet.config import HEAD_WEIGHTS


def _tls_args(p, node: bool = False) -> None:
    p.add_argument("--certs", metavar="DIR", help="folder made by `stoprt fleet certs` (TLS is on by default)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (tests on one machine only)")
    if node:
        p.add_argument("--key", metavar="FILE", help="this board's private key (DIR/nodes/NAME) for node authentication")


def _run(cmd: list[str], env=None) -> int:
    """Run one of Flower's programs in the foreground; Ctrl-C or SIGTERM (``kill``, a service manager)
    stops it too, else a stopped ``stoprt fleet link`` would leave the SuperLink serving."""
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_certs(args) -> int:
    from ..fleet.certs import make_certificates
    written = make_certificates(args.out, args.host, args.node, days=args.days)
    print(f"stoprt fleet: wrote {len(written)} files to {args.out} (keep ca.key and server.key on the server, "
          "give each board ca.crt and its nodes/NAME key)")
    return 0


def run_link(args) -> int:
    from ..fleet import import_flwr
    from ..fleet.launch import flower_env, superlink_command
    import_flwr()
    cmd = superlink_command(args.port, args.host, args.certs, args.insecure, auth=not args.no_auth, database=args.database)
    return _run(cmd, flower_env())


def run_node(args) -> int:
    from ..fleet import import_flwr
    from ..fleet.launch import flower_env, supernode_command
    import_flwr()
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"no folder {args.checkpoint}: start `stoprt stream --learn --fleet --checkpoint "
                         f"{args.checkpoint}` on this board first (or create it)")
    cmd = supernode_command(args.superlink, args.checkpoint, args.name, args.port, args.certs, args.key, args.insecure)
    return _run(cmd, flower_env())


def _write_connection(args) -> Path:
    from ..fleet.launch import write_flower_config
    home = Path(args.work) / "flwr-home"
    write_flower_config(home, args.superlink, args.certs, args.insecure)
    return home


def run_register(args) -> int:
    from ..fleet import import_flwr
    from ..fleet.launch import flower_env, register_key
    import_flwr()
    env = flower_env(_write_connection(args))
    failed = 0
    for key in args.public_key:  # each key is tried: one refused key does not stop the others
        ok, said = register_key(key, env)
        print(f"{key}: {said}", file=sys.stdout if ok else sys.stderr)
        failed += not ok
    return 1 if failed else 0


def run_run(args) -> int:
    from ..fleet import import_flwr
    from ..fleet.launch import flower_env, run_command, write_app
    import_flwr()
    status = Path(args.status_dir or Path(args.work) / "status").resolve()
    config = {"rounds": args.rounds, "min-nodes": args.min_nodes, "node-wait": args.node_wait,
              "round-timeout": args.round_timeout, "straggler-wait": args.straggler_wait, "round-every": args.round_every, "ack-timeout": args.ack_timeout, "prox-mu": args.prox_mu,
              "head-weights": args.head_weights,
              "model": args.model, "size": args.size, "classes": args.classes, "seed": args.seed,
              "status-dir": str(status)}
    app = write_app(Path(args.work) / "app", config)
    home = _write_connection(args)
    code = _run(run_command(app), flower_env(home))
    print(f"stoprt fleet: status in {status} (stoprt fleet status --dir {status})")
    return code


def run_status(args) -> int:
    from ..fleet.status import format_status, read_status
    data = read_status(args.dir)
    print(json.dumps(data, indent=1) if args.json else format_status(data))
    return 0


def register(sub) -> None:
    fleet = sub.add_parser("fleet", help="fleet learning through Flower: certs, link, register, node, run, status")
    fs = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)

    p = fs.add_parser("certs", help="a CA, the SuperLink's TLS certificate and node key pairs")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--host", action="append", required=True, help="a name or IP the boards reach the server by (repeat)")
    p.add_argument("--node", action="append", default=[], help="a board name; its key pair goes to DIR/nodes (repeat)")
    p.add_argument("--days", type=positive_int, default=365)
    p.set_defaults(func=run_certs)

    p = fs.add_parser("link", help="run the SuperLink (the fleet's server)")
    p.add_argument("--port", type=positive_int, default=9093, help="the one HTTP port of Flower 1.42's APIs")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--no-auth", action="store_true", help="accept any SuperNode (TLS stays on)")
    p.add_argument("--database", help="keep the SuperLink's state in this SQLite file")
    _tls_args(p)
    p.set_defaults(func=run_link)

    p = fs.add_parser("register", help="register boards' public keys (DIR/nodes/NAME.pub) with the SuperLink; a "
                      "key it knows is reported as already registered; exit 1 if any key was refused")
    p.add_argument("public_key", nargs="+")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT")
    p.add_argument("--work", default="fleet-work", metavar="DIR", help="where the Flower configuration is written")
    _tls_args(p)
    p.set_defaults(func=run_register)

    p = fs.add_parser("node", help="run this board's SuperNode (the agent beside its stream)")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the stream's --checkpoint folder")
    p.add_argument("--name", default="", help="the board's name in the status")
    p.add_argument("--port", type=positive_int, default=9094, help="this SuperNode's Runtime API port")
    _tls_args(p, node=True)
    p.set_defaults(func=run_node)

    p = fs.add_parser("run", help="run the rounds on the fleet (stoprt's Flower app through `flwr run`)")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT")
    p.add_argument("--work", default="fleet-work", metavar="DIR", help="the app folder and Flower configuration go here")
    p.add_argument("--status-dir", metavar="DIR", help="status.json and global.pt (on the server; default WORK/status)")
    p.add_argument("--rounds", type=positive_int, default=10)
    p.add_argument("--min-nodes", type=positive_int, default=2, help="reports needed to aggregate a round")
    p.add_argument("--node-wait", type=positive_float, default=120.0, help="seconds to wait for --min-nodes nodes")
    p.add_argument("--round-timeout", type=positive_float, default=60.0, help="seconds a round waits for replies")
    p.add_argument("--round-every", type=nonnegative_float, default=0.0,
                   help="seconds from one round's start to the next's at least (more samples per round; 0: back to back)")
    p.add_argument("--straggler-wait", type=positive_float, default=15.0,
                   help="seconds a round still waits for the others once --min-nodes replied")
    p.add_argument("--ack-timeout", type=positive_float, default=10.0, help="seconds an agent waits for its stream")
    p.add_argument("--prox-mu", type=float, default=0.0, help="FedProx-style damping towards the previous global model")
    p.add_argument("--head-weights", choices=HEAD_WEIGHTS, default=HEAD_WEIGHTS[0],
                   help="average the output layer's rows by each board's labelled samples of their class "
                        "(default; boards that see different classes) or, like the other layers, by its labelled samples")
    p.add_argument("--model", default="mlp")
    p.add_argument("--size", type=positive_int, default=16)
    p.add_argument("--classes", type=positive_int, default=10)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    _tls_args(p)
    p.set_defaults(func=run_run)

    p = fs.add_parser("status", help="the rounds, nodes and per-node accuracy of a fleet run")
    p.add_argument("--dir", required=True, help="the run's status folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_status)
