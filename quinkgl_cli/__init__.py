"""quinkgl: a peer daemon for decentralized (gossip) federated learning."""

__version__ = "0.4.0"
# The QuinkGL guide release whose commands and behaviour this version implements (README, "Guide differences").
GUIDE_VERSION = "0.3.4"
