"""What a network costs on a device: memory, time and energy.

* :mod:`.dataflow`: the tensors between a network's layers (shape, producer);
* :mod:`.planner`: analytic training / inference memory (``MemoryPlanner``); :mod:`.fit`: budgets,
  fit, largest batch and T;
* :mod:`.meters`: measuring in this process (saved-for-backward bytes, RSS peak);
* :mod:`.profile`: measured memory, time and energy vs T, each configuration in a fresh process
  (:mod:`.measure`, the child's entry point); :mod:`.workloads`: the network a profile or plan runs.

The torch-free device side (detection, boards, telemetry) is the parent package, :mod:`stoprt.devices`.
"""
