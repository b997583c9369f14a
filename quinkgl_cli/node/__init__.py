"""The node: round logic (core), its asyncio driver (daemon), peer scripts, checkpoints and logs."""
