"""`quinkgl simulate --backend processes`: the sharded schedule (`quinkgl_cli.sim.sharded`) with each shard a
worker process on this machine, so that a run uses every core (the local backend trains the peers one after
another on one).

The workers are started with ``spawn`` (a fork of a process that imported torch may deadlock) and driven over one
pipe each. What crosses a pipe is our own framing: a JSON header naming the method and its plain-data arguments,
then one raw frame per ``bytes`` argument (the shards' `shardwire` batches); answers come back the same way.
Nothing of ours is pickled. A shard runs its calls in the order they were sent, as a Ray actor does, and a reader
thread per worker takes the answers as they come, so that neither end ever waits on a full pipe. The driver hands
a batch from one shard to the next itself (there is no object store): one copy more than Ray, on one machine.

Owns the worker processes, their pipes and their teardown: an error in a worker comes back as the same error
(a `QuinkglError` keeps its one line and exit code), a worker that dies fails every call still waiting on it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from quinkgl_cli import errors
from quinkgl_cli.errors import QuinkglError, UsageError
from quinkgl_cli.sim.peerwarnings import worker_logging
from quinkgl_cli.sim.results import RoundSummary, SimResult
from quinkgl_cli.sim.sharded import ShardedRun, check_mode, worker_args
from quinkgl_cli.sim.simulator import Simulator

STOP = "__stop__"
BUILD = "__init__"
HELD = "__held_warnings__"  # the worker's held peer warnings (`peerwarnings`), as JSON
# Seconds a worker has to leave after it is told to stop, before it is terminated.
STOP_WAIT = 30.0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(peers: int, workers: int | None) -> int:
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers} must be at least 1", "use --workers 1 or more")
    return max(1, min(peers, workers if workers is not None else available_cpus()))


# ---------------------------------------------------------------------------------------------- framing
def send_values(conn: Connection, header: dict[str, Any], values: Sequence[Any]) -> None:
    """``header`` with ``values`` in it: each one plain JSON data, or bytes sent as a raw frame after the header."""
    blobs = [v for v in values if isinstance(v, bytes | bytearray | memoryview)]
    tagged, index = [], 0
    for v in values:
        if isinstance(v, bytes | bytearray | memoryview):
            tagged.append(["b", index])
            index += 1
        else:
            tagged.append(["j", v])
    conn.send_bytes(json.dumps({**header, "values": tagged}).encode())
    for blob in blobs:
        conn.send_bytes(blob)


def recv_values(conn: Connection) -> tuple[dict[str, Any], list[Any]]:
    header = json.loads(conn.recv_bytes())
    tagged = header.pop("values")
    blobs = [conn.recv_bytes() for kind, _ in tagged if kind == "b"]
    return header, [blobs[v] if kind == "b" else v for kind, v in tagged]


# ---------------------------------------------------------------------------------------------- the worker side
def serve(conn: Connection, log_level: int) -> None:
    """A worker process's life: build its `ShardWorker` from the first call, answer calls until told to stop."""
    # Stop signals are the driver's to handle (a terminal's Ctrl-C or hang-up reaches the whole process group): it
    # stops the workers, killing a busy one.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)
    held = worker_logging(log_level)
    from threadpoolctl import threadpool_limits

    from quinkgl_cli.sim.shardworker import ShardWorker

    worker: ShardWorker | None = None
    methods = {name for name in vars(ShardWorker) if not name.startswith("_")}
    with threadpool_limits(limits=1, user_api="blas"):  # see `Simulator.run`: one thread, as the local backend
        while True:
            try:
                header, args = recv_values(conn)
            except EOFError:
                return
            method = header["method"]
            if method == STOP:
                return
            out: Any = None
            try:
                if method == HELD:
                    out = json.dumps(held.export())
                elif method == BUILD:
                    worker = ShardWorker(*args)
                elif worker is None or method not in methods:
                    raise RuntimeError(f"shard worker: no call {method!r} before it is built")
                else:
                    out = getattr(worker, method)(*args)
            except Exception as exc:
                send_values(conn, {"error": _error_data(exc)}, [])
                continue
            if isinstance(out, list):
                send_values(conn, {"list": True}, out)
            else:
                send_values(conn, {"list": False}, [out])


def _error_data(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, QuinkglError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint, "code": int(exc.code)}
    return {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}


def _raised(shard: int, data: dict[str, Any]) -> Exception:
    if "code" in data:
        cls = getattr(errors, data["type"], QuinkglError)
        if not (isinstance(cls, type) and issubclass(cls, QuinkglError)):
            cls = QuinkglError
        return cls(data["message"], data["hint"], code=errors.ExitCode(data["code"]))
    return RuntimeError(f"shard worker {shard} failed: {data['type']}: {data['message']}\n{data['traceback']}")


# ---------------------------------------------------------------------------------------------- the driver side
@dataclass(frozen=True)
class Handle:
    """One value of a call's answer: ``index`` in its list, or the whole answer (None)."""

    answer: Future[list[Any] | Any]
    index: int | None

    def value(self) -> Any:
        out = self.answer.result()
        return out if self.index is None else out[self.index]


class WorkerProcess:
    """One shard's process, its pipe, and the answers it owes in the order of the calls."""

    def __init__(self, shard: int, log_level: int) -> None:
        self.shard = shard
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, log_level), name=f"quinkgl-shard-{shard}",
                                       daemon=True)
        self.process.start()
        child.close()
        self.pending: deque[Future[Any]] = deque()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, name=f"quinkgl-shard-{shard}-reader", daemon=True)
        self.reader.start()

    def call(self, method: str, args: Sequence[Any]) -> Future[Any]:
        answer: Future[Any] = Future()
        with self.lock:
            if not self.process.is_alive() and not self.reader.is_alive():
                raise RuntimeError(f"shard worker {self.shard} is gone (exit code {self.process.exitcode})")
            self.pending.append(answer)
        try:
            send_values(self.conn, {"method": method}, args)
        except OSError as exc:  # it died since: the reader fails what it owed, this call included
            self.reader.join()
            raise RuntimeError(f"shard worker {self.shard} is gone (exit code {self.process.exitcode})") from exc
        return answer

    def _read(self) -> None:
        while True:
            try:
                header, values = recv_values(self.conn)
            except (EOFError, OSError):
                break
            with self.lock:
                answer = self.pending.popleft()
            if "error" in header:
                answer.set_exception(_raised(self.shard, header["error"]))
            else:
                answer.set_result(values if header["list"] else values[0])
        self.process.join(STOP_WAIT)
        with self.lock:
            while self.pending:
                self.pending.popleft().set_exception(RuntimeError(
                    f"shard worker {self.shard} exited (exit code {self.process.exitcode}) with calls unanswered"))

    def stop(self) -> None:
        """Tell an idle worker to leave; one still working on a call (the run failed or was interrupted) is
        killed: what it computes has no one to go to."""
        with self.lock:
            busy = bool(self.pending)
        if not busy:
            try:
                send_values(self.conn, {"method": STOP}, [])
            except OSError:
                busy = True  # its pipe is gone: so is the worker, or it will be
        if not busy:
            self.process.join(STOP_WAIT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        self.reader.join()


class ProcessExecutor:
    """`sharded.Executor` over worker processes: handles are `Handle`s, resolved where a later call needs them."""

    def __init__(self, workers: Sequence[WorkerProcess]) -> None:
        self.workers = list(workers)
        self.shards = len(self.workers)

    def submit(self, shard: int, method: str, args: Sequence[Any], returns: int) -> list[Any]:
        plain = [a.value() if isinstance(a, Handle) else a for a in args]
        answer = self.workers[shard].call(method, plain)
        return [Handle(answer, i) for i in range(returns)] if returns > 1 else [Handle(answer, None)]

    def get(self, handles: list[Any]) -> list[Any]:
        return [h.value() for h in handles]

    def held_warnings(self) -> list[dict[str, Any]]:
        answers = [worker.call(HELD, []) for worker in self.workers]
        return [w for answer in answers for w in json.loads(answer.result())]


class ProcessSimulation:
    """`Simulator`'s ``progress`` and ``run()``, in ``workers`` processes (default: one per available CPU)."""

    def __init__(self, sim: Simulator, workers: int | None = None,
                 progress: Callable[[RoundSummary], None] | None = None) -> None:
        check_mode(sim, "processes")
        self.sim = sim
        self.shards = worker_count(sim.config.peers, workers)
        self.progress = progress

    def run(self) -> SimResult:
        level = logging.getLogger("quinkgl").getEffectiveLevel()
        processes: list[WorkerProcess] = []
        try:
            for i in range(self.shards):
                processes.append(WorkerProcess(i, level))
            executor = ProcessExecutor(processes)
            executor.get([executor.submit(i, BUILD, worker_args(self.sim, i, self.shards), 1)[0]
                          for i in range(self.shards)])
            return ShardedRun(self.sim, executor, "processes", self.progress).run()
        finally:
            for p in processes:
                p.stop()
