"""Fleet learning: many boards learning in situ, combined through Flower's deployment engine.

The layer above :mod:`stoprt.runtime` and :mod:`stoprt.export` (nothing below imports it). Each board
runs ``stoprt stream --learn --fleet`` on its own source and a Flower SuperNode whose ClientApp is
stoprt's agent (:mod:`.app`); a SuperLink runs stoprt's ServerApp, which aggregates the boards'
weights, thresholds and leaks every round (:mod:`.aggregate`). The session and the agent exchange
parameters through files (:mod:`stoprt.runtime.stream.merge`). Modules:

* :mod:`.aggregate`: validation of node reports and the weighted average (numpy only);
* :mod:`.agent`: the board side of a round (files only, no network);
* :mod:`.app`: the Flower ServerApp and ClientApp (imports ``flwr``);
* :mod:`.status`: the server's status file (``stoprt fleet status``);
* :mod:`.launch`: command lines of the SuperLink, SuperNodes and ``flwr run``;
* :mod:`.certs`: TLS certificates and node keys;
* :mod:`.shares`: non-IID shares of the built-in digits and held-out evaluation (tests, benchmark).

``flwr`` is an optional extra (``pip install stoprt[fleet]``), imported only where needed.
"""

from __future__ import annotations


def import_flwr():
    """``flwr``, or an ImportError of one line naming the extra to install."""
    try:
        import flwr
    except ImportError:
        raise ImportError("stoprt fleet needs Flower: pip install 'stoprt[fleet]' (flwr>=1.42)") from None
    return flwr
