"""An asyncio event loop whose clock is virtual: when nothing is ready to run, time jumps to the next timer.

The field driver (`quinkgl_cli.sim.field`) runs the daemon's round loop for every simulated peer on one such loop,
so ``asyncio.sleep``, ``asyncio.wait(timeout=...)`` and ``call_later`` keep their meaning in virtual seconds and
a run never waits in real time. The loop is a standard `asyncio.SelectorEventLoop`; only three things change:
``time()`` reads a `VirtualClock`; the selector, asked to block for ``timeout`` seconds, first looks (without
blocking) for real events (the loop's own wake-up pipe) and otherwise moves the clock forward by ``timeout`` and
reports nothing, which makes the loop run the timers now due; and a timer run moves the clock to its own time if
that is still ahead (one due within the clock's resolution runs at once). Asked to block with no timer at all, nothing could
ever happen again: that is a deadlock, raised as an error instead of hanging.

Everything is deterministic for a seed as long as no real thread or socket takes part: the simulated peers train
in place (charged a modelled duration) and talk through the in-memory network.

Owns the clock's advance and the selector wrapper only.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import selectors
from collections.abc import Callable
from typing import Any, Protocol, TypeVarTuple

_Ts = TypeVarTuple("_Ts")


class VirtualClock(Protocol):
    now: float

    def __call__(self) -> float: ...


class VirtualTimeDeadlock(RuntimeError):
    """Every task waits with no timeout and nothing can wake it."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise VirtualTimeDeadlock("virtual time: every task waits and no timer is set")
        self._clock.now += timeout
        return []


def _at(clock: VirtualClock, when: float, callback: Callable[..., object], *args: Any) -> None:
    if clock.now < when:
        clock.now = when
    callback(*args)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        self._virtual = clock
        super().__init__(selector=_VirtualSelector(clock))
        # The loop fires timers due within one resolution of now; the clock moves by exact differences.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual.now

    def call_at(self, when: float, callback: Callable[[*_Ts], object], *args: *_Ts,
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        # The loop runs a timer due within its clock resolution of now without waiting; the clock must still reach
        # the timer's time, or a sleep shorter than the resolution would end without time passing and a caller
        # sleeping "until the deadline" would sleep again, forever.
        return super().call_at(when, functools.partial(_at, self._virtual, when, callback, *args), context=context)

    def run_virtual(self, main: Any) -> Any:
        """Run the coroutine ``main`` to its end on this loop (set as the current loop meanwhile), then close it."""
        asyncio.set_event_loop(self)
        try:
            return self.run_until_complete(main)
        finally:
            try:
                self.run_until_complete(self.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                self.close()
