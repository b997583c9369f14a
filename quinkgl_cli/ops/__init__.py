"""Operating peers: the state a running daemon publishes (`snapshot`), where that state goes, and the files a new
swarm starts from (`scaffold`, for `quinkgl init`).

The daemon hands a `DaemonSnapshot` to one `Observer` (`observer`) at start, after each round, on a stop request
and at its end; the observer fans it out to a local status socket (`status_server`, read by `quinkgl status`
through `status_client`, found via `registry`), a Prometheus endpoint (`exporter`) and a JSON-lines metrics file
(`metrics_file`, summed up and drawn by `report`). Nothing here knows the node's internals: it sees snapshots only
(`quinkgl_cli.node.observed` makes them).
"""
