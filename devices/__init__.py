"""Device support: what the runtime runs on and what it costs there.

* :mod:`~stoprt.devices.detect`: Jetson (board, L4T/JetPack), CUDA GPU or CPU; ``detect(root)``
* :mod:`~stoprt.devices.boards`: Jetson board profiles and the JetPack table; ``get_board(key)``
* :mod:`~stoprt.devices.telemetry`: tegrastats parsing, sysfs readers, memory views and
  ``TelemetrySampler`` (energy per run and per time step)
* :mod:`~stoprt.devices.planner`: analytic training / inference memory of a network
  (``MemoryPlanner``); :mod:`~stoprt.devices.fit`: budgets, fit, largest batch and T
* :mod:`~stoprt.devices.profile`: measured memory, time and energy vs T, each configuration in a fresh
  process (:mod:`~stoprt.devices.measure`)

The ``stoprt info``, ``profile`` and ``plan`` subcommands are in :mod:`stoprt.commands.device`.
Nothing is imported here, so importing the telemetry modules stays light (torch is never loaded).
"""
