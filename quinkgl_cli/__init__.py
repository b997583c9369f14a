"""quinkgl: a peer daemon for decentralized (gossip) federated learning."""

__version__ = "0.1.0"
