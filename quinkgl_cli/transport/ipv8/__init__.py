"""The IPv8 transport (see `transport.IPv8Transport`). Importing this package imports pyipv8, never its REST API."""

from quinkgl_cli.transport.ipv8.transport import IPv8Transport, parse_address

__all__ = ["IPv8Transport", "parse_address"]
