"""The transport's background work and its way out to the node.

Owns the set of tasks the transport spawned (so stop can cancel and await every one, and a task that dies of a
bug is logged, not lost) and the node's event callbacks (a callback that raises is reported once per kind and the
transport goes on).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from quinkgl_cli.events import emit
from quinkgl_cli.transport.base import ModelReceived, PeerInfo, TransportEvents
from quinkgl_cli.transport.common import OnceLog

log = logging.getLogger("quinkgl.transport")


class TaskRegistry:
    def __init__(self, loop: asyncio.AbstractEventLoop, node_id: str) -> None:
        self._loop = loop
        self._node_id = node_id
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro, name=f"quinkgl-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            emit(log, logging.ERROR, "transport-task-failed", context={"node": self._node_id}, exc_info=exc,
                 task=task.get_name(), error=repr(exc))

    async def cancel_all(self, timeout: float = 2.0) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._tasks.clear()


class NodeEvents:
    """The node's callbacks, each shielded: a handler's exception is logged (once per kind) and swallowed there,
    because one bad update must not stop the transport delivering the next."""

    def __init__(self, events: TransportEvents, once: OnceLog) -> None:
        self._events = events
        self._once = once

    def peer_discovered(self, peer: PeerInfo) -> None:
        self._call("on_peer_discovered", peer)

    def peer_lost(self, peer: PeerInfo) -> None:
        self._call("on_peer_lost", peer)

    def model(self, update: ModelReceived) -> None:
        self._call("on_model", update)

    def message(self, sender: str, kind: str, body: dict[str, Any]) -> None:
        self._call("on_message", sender, kind, body)

    def _call(self, name: str, *args: Any) -> None:
        try:
            getattr(self._events, name)(*args)
        except Exception as exc:  # the node's handler failed: say so loudly (once per kind), keep the transport alive
            self._once("event-handler-failed", "-", f"{name}:{type(exc).__name__}", level=logging.ERROR, exc_info=exc,
                       error=str(exc)[:200])
