"""The decoupled input pipeline: a producer thread reads and bins, the consumer learns.

::

    with StreamPipeline(UDPSource(port=3333, sensor_size=(128, 128)), Binner((128, 128), 32)) as pipe:
        for step in pipe:                 # Step(frame [C, H, W], t_start, t_end, n_events, index)
            learner.step(step.batch, target)             # step.batch: the frame as [1, C, H, W]

The producer iterates the source, pushes each packet into the binner and puts the completed steps in
a queue of at most ``max_queue_steps`` steps (so memory is bounded whatever the input rate). When the
queue is full:

* ``realtime=False`` (back-pressure): the producer waits for the consumer; nothing is dropped. Right
  for recordings replayed as fast as possible.
* ``realtime=True``: the producer never waits (a live camera cannot); whole steps are dropped and
  counted: ``drop="oldest"`` discards the oldest queued step to make room (the consumer sees the
  freshest data), ``drop="newest"`` discards the incoming step (the consumer sees an unbroken run
  of old steps, then a jump).

A source whose packets are already in memory (``in_memory = True``, as the built-in streams) has
nothing to wait for, so by default (``thread=None``) no thread runs: the consumer bins the next
packet itself when it needs a step. A producer thread would only compete with the model for the
interpreter lock at every torch call.

``realtime=None`` (the default) takes the source's ``live`` attribute. At the end of the source the
binner's partial step is flushed into the queue. An exception in the producer ends production and
is re-raised (the same exception object) in the consumer after the steps queued before it.
:meth:`close` (or leaving the ``with`` block) stops the producer, closes the source and joins the
thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Iterable, Iterator

from .binning import Binner, Step


class StreamPipeline:
    """Producer thread ``source -> binner -> bounded queue``; iterate for :class:`Step` objects.

    ``stats`` (at any time): ``steps_produced``, ``steps_consumed``, ``steps_dropped``, ``packets``,
    ``events``, ``queued``, ``queue_peak``, ``stream_s`` (stream time covered by the produced steps),
    ``wall_s`` (since start, until the producer finished), ``realtime_factor`` (stream_s / wall_s:
    above 1 means faster than real time), and the ``source`` and ``binner`` counters.
    """

    def __init__(self, source: Iterable, binner: Binner, max_queue_steps: int = 8, drop: str = "oldest",
                 realtime: bool | None = None, thread: bool | None = None) -> None:
        if not isinstance(max_queue_steps, int) or max_queue_steps < 1:
            raise ValueError(f"max_queue_steps must be an int >= 1, got {max_queue_steps!r}")
        if drop not in ("oldest", "newest"):
            raise ValueError(f"drop must be 'oldest' or 'newest', got {drop!r}")
        self.source, self.binner = source, binner
        self.max_queue_steps, self.drop = max_queue_steps, drop
        self.realtime = bool(getattr(source, "live", False)) if realtime is None else bool(realtime)
        in_memory = bool(getattr(source, "in_memory", False)) and not self.realtime
        self.threaded = not in_memory if thread is None else bool(thread)
        self._inline: Iterator[Step] | None = None  # the production, run by the consumer (no thread)
        self._queue: deque[Step] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = False
        # Who is blocked on ``_cond``: each side wakes the other only when it waits, and a full queue
        # wakes the producer once half of it is consumed, not at every step (fewer thread switches).
        self._consumer_waiting = self._producer_waiting = False
        self._error: BaseException | None = None
        self._counts = {"steps_produced": 0, "steps_consumed": 0, "steps_dropped": 0, "packets": 0, "events": 0,
                        "queue_peak": 0}
        self._first_t: int | None = None
        self._last_t: int | None = None
        self._wall0: float | None = None
        self._wall1: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "StreamPipeline":
        """Start the producer thread (iteration starts it too); a second call does nothing."""
        if self._thread is None and self._inline is None:
            if self._stop.is_set():
                raise ValueError("this StreamPipeline is closed")
            self._wall0 = time.monotonic()
            if not self.threaded:
                self._inline = self._steps_inline()
                return self
            self._thread = threading.Thread(target=self._produce, name="stoprt-stream-producer", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the producer, close the source and wait (up to ``timeout_s``) for the thread."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        close = getattr(self.source, "close", None)
        if close is not None:
            try:
                close()  # wakes a source blocked in a read
            except ValueError:  # a plain generator running in the producer: closed there once it stops
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._inline is not None:
            self._inline.close()
            self._wall1 = self._wall1 or time.monotonic()
        with self._cond:
            self._queue.clear()
            self._done = True
            self._cond.notify_all()

    def __enter__(self) -> "StreamPipeline":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- consumer ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Step]:
        self.start()
        return self if self._inline is None else self._inline

    def __next__(self) -> Step:
        step = self.next_step()
        if step is None:
            raise StopIteration
        return step

    def next_step(self, timeout_s: float | None = None) -> Step | None:
        """The next step; ``None`` at the end of the stream or when ``timeout_s`` passes without one.
        Re-raises the producer's exception once the steps queued before it are consumed."""
        self.start()
        if self._inline is not None:
            return next(self._inline, None)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._queue and not self._done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._consumer_waiting = False
                    return None
                self._consumer_waiting = True
                self._cond.wait(remaining)
            self._consumer_waiting = False
            if self._queue:
                step = self._queue.popleft()
                self._counts["steps_consumed"] += 1
                if self._producer_waiting and len(self._queue) <= self.max_queue_steps // 2:
                    self._cond.notify_all()
                return step
            error, self._error = self._error, None
        if error is not None:
            raise error
        return None

    @property
    def stats(self) -> dict[str, Any]:
        with self._cond:
            counts = dict(self._counts, queued=len(self._queue))
        stream_s = 0.0 if self._first_t is None else (self._last_t - self._first_t) / 1e6
        end = self._wall1 if self._wall1 is not None else time.monotonic()
        wall_s = 0.0 if self._wall0 is None else end - self._wall0
        return {**counts, "stream_s": stream_s, "wall_s": wall_s,
                "realtime_factor": stream_s / wall_s if wall_s > 0 else 0.0,
                "source": dict(getattr(self.source, "stats", {})), "binner": self.binner.stats}

    # -- producer ------------------------------------------------------------------------------------
    def _production(self) -> Iterator[Step]:
        """The steps of the stream: each packet through the binner, then its partial step."""
        for packet in self.source:
            if self._stop.is_set():
                return
            self._counts["packets"] += 1
            self._counts["events"] += len(packet)
            yield from self.binner.push(packet)
        if not self._stop.is_set():
            yield from self.binner.flush()

    def _produce(self) -> None:
        try:
            for step in self._production():
                if not self._put(step):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            if not self._stop.is_set():
                self._error = exc
        finally:
            self._finish()

    def _finish(self) -> None:
        """The production ended (or failed): close the source, wake the consumer."""
        self._wall1 = time.monotonic()
        close = getattr(self.source, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:  # a failing close must not hide the stream's own outcome
                self._error = self._error or exc
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _steps_inline(self) -> Iterator[Step]:
        """The steps, produced by the consumer itself (see the module docstring), with the same
        bookkeeping and errors as threaded; one generator, resumed once per step on the thread that
        also runs the model."""
        counts, production = self._counts, self._production()
        try:
            for step in production:
                self._note(step)
                counts["steps_consumed"] += 1
                counts["queue_peak"] = 1
                yield step
        except GeneratorExit:  # close(): it stops the source itself
            production.close()
            raise
        except BaseException:
            self._finish()
            raise
        self._finish()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _put(self, step: Step) -> bool:
        """Queue one step by the policy; False when the pipeline is closing."""
        with self._cond:
            if self.realtime:
                if len(self._queue) >= self.max_queue_steps:
                    self._counts["steps_dropped"] += 1
                    if self.drop == "newest":
                        self._note(step)
                        return not self._stop.is_set()
                    self._queue.popleft()
            else:
                while len(self._queue) >= self.max_queue_steps and not self._stop.is_set():
                    self._producer_waiting = True
                    self._cond.wait(0.1)
                self._producer_waiting = False
            if self._stop.is_set():
                return False
            self._queue.append(step)
            self._counts["queue_peak"] = max(self._counts["queue_peak"], len(self._queue))
            self._note(step)
            if self._consumer_waiting:
                self._cond.notify_all()
        return True

    def _note(self, step: Step) -> None:
        self._counts["steps_produced"] += 1
        if self._first_t is None:
            self._first_t = step.t_start
        self._last_t = step.t_end

    def __repr__(self) -> str:
        return (f"StreamPipeline({self.source!r}, {self.binner!r}, max_queue_steps={self.max_queue_steps}, "
                f"drop={self.drop!r}, realtime={self.realtime})")
