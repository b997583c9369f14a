"""The daemon's one `Observer`: opens the outputs the flags ask for and hands each snapshot to all of them.

`open_observer` binds everything before the daemon starts its rounds, so a busy ``--metrics-port`` or an
unwritable ``--metrics-file`` stops start-up with its exit code. Later, an output that fails to take a snapshot
(a full disk) is reported as a ``ops-output-failed`` warning and tried again with the next one: reporting must
never stop training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from quinkgl_cli.errors import QuinkglError
from quinkgl_cli.events import emit
from quinkgl_cli.ops.exporter import DEFAULT_LISTEN, MetricsExporter
from quinkgl_cli.ops.metrics_file import MetricsFile
from quinkgl_cli.ops.registry import runtime_dir
from quinkgl_cli.ops.snapshot import DaemonSnapshot
from quinkgl_cli.ops.status_server import StatusServer

log = logging.getLogger("quinkgl.ops")


@dataclass(frozen=True)
class OpsSettings:
    metrics_port: int | None = None  # None: no Prometheus endpoint
    metrics_listen: str = DEFAULT_LISTEN
    metrics_file: Path | None = None


class _Output(Protocol):
    def start(self) -> None: ...

    def update(self, snapshot: DaemonSnapshot) -> None: ...

    def close(self) -> None: ...


class OpsObserver:
    def __init__(self, outputs: dict[str, _Output]) -> None:
        self.outputs = outputs

    def update(self, snapshot: DaemonSnapshot) -> None:
        for name, output in self.outputs.items():
            try:
                output.update(snapshot)
            except (QuinkglError, OSError) as exc:
                message = exc.one_line() if isinstance(exc, QuinkglError) else str(exc)
                emit(log, logging.WARNING, "ops-output-failed", output=name, error=message)

    def close(self) -> None:
        for output in self.outputs.values():
            output.close()


def open_observer(settings: OpsSettings, state_dir: Path | None = None, node_id: str | None = None) -> OpsObserver:
    """Start the status socket (in `registry.runtime_dir` of ``state_dir``) and the outputs ``settings`` ask for;
    on a failure, close what was started."""
    outputs: dict[str, _Output] = {"status": StatusServer(runtime_dir(state_dir), node_id)}
    exporter = None
    if settings.metrics_port is not None:
        exporter = outputs["metrics-endpoint"] = MetricsExporter(settings.metrics_port, settings.metrics_listen)
    if settings.metrics_file is not None:
        outputs["metrics-file"] = MetricsFile(settings.metrics_file)
    started: list[_Output] = []
    try:
        for output in outputs.values():
            output.start()
            started.append(output)
    except BaseException:
        for output in started:
            output.close()
        raise
    if exporter is not None:
        host, port = exporter.address
        emit(log, logging.INFO, "metrics-listening", address=f"{host}:{port}", path="/metrics")
    return OpsObserver(outputs)
