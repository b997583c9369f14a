"""Learning strategies: aggregation, topology, compression, privacy. `registry` is import-light (no torch)."""
