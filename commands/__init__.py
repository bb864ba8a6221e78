"""The ``stoprt`` subcommands: the layer on top of :mod:`stoprt.runtime`, :mod:`stoprt.export` and
:mod:`stoprt.devices`.

One module per command or group, each with ``register(subparsers)``: :mod:`.demo`, :mod:`.train`,
:mod:`.stream`, :mod:`.export`, :mod:`.import_` (``stoprt import``), :mod:`.device` (``info``,
``profile``, ``plan``), :mod:`.fleet` (``stoprt fleet``). :mod:`stoprt.cli` builds the parser from them and maps failures to exit codes;
the argument types they share are in :mod:`stoprt.cli_args`. Nothing below this layer imports it.
Nothing heavy is imported at module level, so ``stoprt --help`` stays fast.
"""
