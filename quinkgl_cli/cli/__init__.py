"""Command-line layer: parses flags, calls the core, prints. One module per command."""
