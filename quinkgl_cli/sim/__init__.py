"""The many-peer simulator: N real nodes over the in-memory transport, in lockstep virtual time."""
