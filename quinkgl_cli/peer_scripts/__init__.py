"""Peer scripts shipped inside the package, so `quinkgl demo` works from an installed wheel (the checkout's
``peer_scripts/digits_peer_script.py`` re-exports this one; mnist and cifar10 stay there as examples)."""
