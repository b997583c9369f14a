"""Learning strategies: aggregation, topology, fingerprints, compression, privacy and spectral analysis.

`registry` builds a strategy from a manifest spec; the names and parameter schemas it resolves live in
`quinkgl_cli.manifest.catalogue`, which stays import-light (no torch).
"""
