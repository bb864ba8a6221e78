"""Device support: what the runtime runs on (this package, torch-free) and what a network costs
there (:mod:`stoprt.devices.cost`, which uses torch).

* :mod:`~stoprt.devices.detect`: Jetson (board, L4T/JetPack), CUDA GPU or CPU; ``detect(root)``
* :mod:`~stoprt.devices.boards`: Jetson board profiles and the JetPack table; ``get_board(key)``
* :mod:`~stoprt.devices.telemetry`: tegrastats parsing, sysfs readers, memory views and
  ``TelemetrySampler`` (energy per run and per time step)
* :mod:`~stoprt.devices.cost`: the planner (analytic memory), fit (budgets, largest batch and T),
  meters, and profiles measured each configuration in a fresh process

The ``stoprt info``, ``profile`` and ``plan`` subcommands are in :mod:`stoprt.commands.device`.
Nothing is imported here, so importing the telemetry modules stays light (torch is never loaded).
"""
