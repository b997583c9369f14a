"""Operating a running daemon: the state it publishes (`snapshot`) and where that state goes.

The daemon hands a `DaemonSnapshot` to one `Observer` at start, after each round and at its end; the observer
fans it out to a local status socket (`status_server`, read by `quinkgl status` through `status_client`, found via
`registry`), a Prometheus endpoint (`exporter`) and a JSON-lines metrics file (`metrics_file`, drawn by
`report`). Nothing here knows the node's internals: it sees snapshots only.
"""
