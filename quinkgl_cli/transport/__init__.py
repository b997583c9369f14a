"""Transports: how peers find each other and move updates. The node sees only `base.Transport`."""
