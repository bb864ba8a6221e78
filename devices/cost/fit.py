"""Does a training or inference configuration fit a device? Budgets and the largest batch and T.

A budget is what the planner's total may use:

* a Jetson board (``orin-nano-4gb`` ...): :attr:`BoardProfile.usable_mib`, i.e. the DRAM less the OS
  and the CUDA context plus torch (:mod:`stoprt.devices.boards`). Tensors are planned as the CUDA
  allocator holds them (512-byte blocks) plus ``CUDA_RESERVED_SLACK`` for what the caching allocator
  reserves beyond its allocated peak;
* ``cpu``: this machine's MemAvailable now; the plan then includes the measured process overhead.

Memory grows linearly with the batch and, for BPTT, with T; for STOP it does not depend on T, so the
largest T is unbounded (reported as None).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .. import boards
from .planner import CUDA_RESERVED_SLACK, MIB, MemoryPlan, MemoryPlanner
from ..sysfs import read_system_memory

_SEARCH_LIMIT = 1 << 30  # beyond this the answer is "more than anyone will run"


@dataclass
class Budget:
    """Memory a plan may use on a device, and how plans are made for it."""

    key: str
    name: str
    device: str         # "cuda" or "cpu": how tensors are planned
    budget_mib: float
    slack: float        # fraction added to a plan's total (allocator fragmentation)
    notes: list[str] = field(default_factory=list)


def device_keys() -> list[str]:
    return ["cpu", *boards.board_keys()]


def budget_for(key: str, root: str = "/") -> Budget:
    """The budget of a board key or ``cpu``; ValueError naming the valid keys for anything else."""
    if key == "cpu":
        mem = read_system_memory(root)
        if mem.available_mib is None:
            raise ValueError("cannot read MemAvailable from /proc/meminfo for the cpu budget")
        return Budget("cpu", "this machine (CPU)", "cpu", mem.available_mib, 0.0,
                      ["budget: MemAvailable now; the plan includes the process overhead of python + torch"])
    try:
        board = boards.get_board(key)
    except boards.UnknownBoardError:
        raise ValueError(f"unknown device {key!r}; valid: {', '.join(device_keys())}") from None
    return Budget(key, board.name, "cuda", float(board.usable_mib), CUDA_RESERVED_SLACK,
                  [f"usable {board.usable_mib} MiB = {board.dram_mib} MiB DRAM - {boards.OS_RESERVE_MIB} OS "
                   f"- {boards.CUDA_RESERVE_MIB} CUDA context and torch (planning figures, devices/boards.py)",
                   f"CUDA allocator view + {CUDA_RESERVED_SLACK:.0%} for its reserved-but-free blocks "
                   "(an assumption: check with examples/device/gpu_profile.sh)"])


@dataclass
class Fit:
    """One configuration against a budget."""

    mode: str
    batch: int
    T: int
    need_mib: float
    budget_mib: float
    plan: MemoryPlan

    @property
    def fits(self) -> bool:
        return self.need_mib <= self.budget_mib

    @property
    def headroom_mib(self) -> float:
        return self.budget_mib - self.need_mib

    @property
    def headroom_pct(self) -> float:
        return 100.0 * self.headroom_mib / self.budget_mib if self.budget_mib else float("-inf")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "batch": self.batch, "T": self.T, "need_mib": self.need_mib,
                "budget_mib": self.budget_mib, "fits": self.fits, "headroom_mib": self.headroom_mib,
                "headroom_pct": self.headroom_pct, "plan": self.plan.to_dict()}


def check(planner: MemoryPlanner, budget: Budget, mode: str, batch: int, T: int, **kw) -> Fit:
    """Plan ``mode`` at ``batch`` and ``T`` for ``budget``'s device and compare."""
    plan = planner.plan(mode, batch, T, device=budget.device, **kw)
    return Fit(mode, batch, T, plan.total * (1 + budget.slack) / MIB, budget.budget_mib, plan)


def _largest(fits) -> int:
    """The largest n >= 1 with fits(n), for fits monotone (true then false); 0 if not even 1."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= _SEARCH_LIMIT and fits(hi):
        lo, hi = hi, hi * 2
    if hi > _SEARCH_LIMIT:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_batch(planner: MemoryPlanner, budget: Budget, mode: str, T: int, **kw) -> int:
    """The largest batch that fits at ``T`` (0: not even batch 1)."""
    return _largest(lambda b: check(planner, budget, mode, b, T, **kw).fits)


def largest_T(planner: MemoryPlanner, budget: Budget, mode: str, batch: int, **kw) -> int | None:
    """The largest T that fits at ``batch``; None when memory does not depend on T and it fits (STOP,
    inference); 0 when not even T = 1 fits."""
    far = check(planner, budget, mode, batch, _SEARCH_LIMIT, **kw)
    if far.need_mib == check(planner, budget, mode, batch, 2, **kw).need_mib:
        return None if far.fits else _largest(lambda t: check(planner, budget, mode, batch, t, **kw).fits)
    return _largest(lambda t: check(planner, budget, mode, batch, t, **kw).fits)


def fit_report(planner: MemoryPlanner, budget: Budget, mode: str, batch: int, T: int, **kw) -> dict:
    """The configuration's fit, and the largest batch and T for STOP, BPTT and inference."""
    main = check(planner, budget, mode, batch, T, **kw)
    limits = {m: {"largest_batch": largest_batch(planner, budget, m, T, **kw),
                  "largest_T": largest_T(planner, budget, m, batch, **kw),
                  "batch1_need_mib": check(planner, budget, m, 1, T, **kw).need_mib,
                  "largest_T_batch1": largest_T(planner, budget, m, 1, **kw)}
              for m in ("stop", "bptt", "infer")}
    return {"budget": asdict(budget), "fit": main.to_dict(), "limits": limits}


def format_report(report: dict, model: str) -> str:
    """The human-readable lines of :func:`fit_report`."""
    b, f = report["budget"], report["fit"]
    p = f["plan"]["mib"]
    mode = f["mode"].upper() if f["mode"] != "infer" else "inference"
    lines = [f"stoprt plan: {model} on {b['name']}",
             f"  budget: {b['budget_mib']:.0f} MiB" + "".join(f"\n    {n}" for n in b["notes"]),
             f"  {mode}, batch {f['batch']}, T {f['T']}: needs {f['need_mib']:.1f} MiB -> "
             + (f"fits, headroom {f['headroom_mib']:.1f} MiB ({f['headroom_pct']:.1f}%)" if f["fits"]
                else f"does NOT fit: {-f['headroom_mib']:.1f} MiB over ({-f['headroom_pct']:.1f}%)"),
             f"    parameters {p['parameters']:.1f}, buffers {p['buffers']:.1f}, optimizer {p['optimizer_state']:.1f}, "
             f"gradients {p['gradients']:.1f}, state {p['state']:.1f}, saved for backward {p['activations']:.1f}, "
             f"working set {max(p['transient'], p['update_transient']):.1f}, overhead {p['overhead']:.1f} MiB",
             "  largest that fit:"]
    for m, lim in report["limits"].items():
        name = m.upper() if m != "infer" else "inference"
        if lim["largest_batch"] == 0:
            t1 = lim["largest_T_batch1"]
            lines.append(f"    {name:9s} does not fit even at batch 1 (T {f['T']}): needs "
                         f"{lim['batch1_need_mib']:.1f} of {b['budget_mib']:.0f} MiB; "
                         + (f"at batch 1 up to T {t1}" if t1 else "not even at T 1"))
            continue
        t = lim["largest_T"]
        t_text = ("T unbounded (memory does not grow with T)" if t is None
                  else "not even T 1" if t == 0 else f"T {t}")
        lines.append(f"    {name:9s} batch {lim['largest_batch']} at T {f['T']}; {t_text} at batch {f['batch']}")
    return "\n".join(lines)
