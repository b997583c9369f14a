"""The Prometheus endpoint (`--metrics-port`): the latest snapshot as metrics, served by `prometheus_client`.

Metrics (all labelled ``node`` and ``swarm``): ``quinkgl_info`` (1, with ``manifest`` and ``state``),
``quinkgl_round``, ``quinkgl_round_target`` (absent when unlimited), ``quinkgl_known_peers``,
``quinkgl_round_peers`` (peers aggregated in the last round), ``quinkgl_last_aggregation_round`` and
``..._timestamp_seconds``, ``quinkgl_train_loss``, ``quinkgl_train_accuracy``, ``quinkgl_val_loss``,
``quinkgl_val_accuracy`` (absent until known), ``quinkgl_own_accuracy`` (the personal model on the peer's own
label distribution) and ``quinkgl_apfl_alpha`` (APFL only), ``quinkgl_sent_bytes_total`` and ``quinkgl_received_bytes_total``
(the whole run, a resumed run's earlier processes included), ``quinkgl_dp_epsilon_spent`` (absent without differential privacy), ``quinkgl_dp_epsilon_remaining`` (privacy
mode dp_sgd only) and
``quinkgl_start_time_seconds``. The collector reads the snapshot at scrape time; it keeps no counters of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from quinkgl_cli import validation
from quinkgl_cli.errors import NetworkError
from quinkgl_cli.ops.snapshot import DaemonSnapshot

DEFAULT_LISTEN = "127.0.0.1"


class SnapshotCollector:
    """A `prometheus_client` collector over whatever snapshot was stored last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: DaemonSnapshot | None = None

    def update(self, snapshot: DaemonSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            s = self._snapshot
        if s is None:
            return
        labels = ["node", "swarm"]
        values = [s.node_id, s.swarm_id]

        def gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
            if value is None:
                return
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, float(value))
            yield family

        def counter(name: str, doc: str, value: int) -> Iterator[Metric]:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, float(value))
            yield family

        info = GaugeMetricFamily("quinkgl_info", "This daemon (always 1).", labels=[*labels, "manifest", "state"])
        info.add_metric([*values, s.manifest, s.state], 1.0)
        yield info
        yield from gauge("quinkgl_round", "Rounds completed.", s.round)
        yield from gauge("quinkgl_round_target", "Rounds this run stops after.", s.rounds)
        yield from gauge("quinkgl_known_peers", "Peers the transport currently knows.", len(s.peers))
        yield from gauge("quinkgl_round_peers", "Remote peers aggregated in the last round.",
                         s.round_metrics.get("peers") if isinstance(s.round_metrics.get("peers"), int) else None)
        agg = s.last_aggregation
        yield from gauge("quinkgl_last_aggregation_round", "Last round that aggregated peers' updates.",
                         agg.round if agg else None)
        yield from gauge("quinkgl_last_aggregation_timestamp_seconds", "When that aggregation happened (unix time).",
                         agg.at if agg else None)
        yield from gauge("quinkgl_train_loss", "Training loss of the last round.", s.loss)
        yield from gauge("quinkgl_train_accuracy", "Training accuracy of the last round.", s.accuracy)
        yield from gauge("quinkgl_val_loss", "Validation loss after the last round.", s.val_loss)
        yield from gauge("quinkgl_val_accuracy", "Validation accuracy after the last round.", s.val_accuracy)
        own = s.round_metrics.get("own_accuracy")
        yield from gauge("quinkgl_own_accuracy", "Accuracy of this peer's personal model on its own label distribution.",
                         own if isinstance(own, float) else None)
        alpha = s.round_metrics.get("alpha")
        yield from gauge("quinkgl_apfl_alpha", "APFL's mixing weight of the local model.",
                         alpha if isinstance(alpha, float) else None)
        yield from counter("quinkgl_sent_bytes", "Model bytes sent over the whole run.", s.bytes_sent)
        yield from counter("quinkgl_received_bytes", "Model bytes received over the whole run.",
                           s.bytes_received)
        yield from gauge("quinkgl_dp_epsilon_spent", "Differential-privacy epsilon spent so far.", s.dp_epsilon_spent)
        remaining = s.round_metrics.get("dp_epsilon_remaining")
        yield from gauge("quinkgl_dp_epsilon_remaining", "DP-SGD epsilon left of the whole run's budget.",
                         remaining if isinstance(remaining, (int, float)) else None)
        yield from gauge("quinkgl_start_time_seconds", "When this process started (unix time).", s.started_at)


class MetricsExporter:
    """Serves ``/metrics`` on ``listen:port`` (port 0: any free one; `address` says which) until `close`."""

    def __init__(self, port: int, listen: str = DEFAULT_LISTEN) -> None:
        self.listen = validation.listen_address(listen, "--metrics-listen")
        self.port = validation.listen_port(port, "--metrics-port")
        self.collector = SnapshotCollector()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.listen, registry=registry)
        except OSError as exc:
            raise NetworkError(f"--metrics-port {self.port}: cannot listen on {self.listen}:{self.port}: {exc.strerror}",
                               "choose another --metrics-port") from exc

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the metrics endpoint is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def update(self, snapshot: DaemonSnapshot) -> None:
        self.collector.update(snapshot)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
