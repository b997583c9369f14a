"""Benchmark peer script: the shipped digits script with an artificial slowdown, for straggler runs.

Script argument ``sleep_per_batch=S`` sleeps S seconds before each training batch (default 0: the digits script
unchanged), so one peer of a swarm can be made slow the way a weaker device is: its rounds take longer, nothing else
about it changes. Every other argument and hook is the digits script's.
"""

import time

from quinkgl_cli.peer_scripts import digits_peer_script as digits

build_model = digits.build_model
build_optimizer = digits.build_optimizer
on_round_end = digits.on_round_end
on_peer_discovered = digits.on_peer_discovered
on_aggregation_done = digits.on_aggregation_done


class _Slowed:
    """The training loader, sleeping before each batch; everything else (dataset, batch size, len) is the loader's."""

    def __init__(self, loader, seconds):
        self._loader = loader
        self._seconds = seconds

    def __iter__(self):
        for batch in self._loader:
            time.sleep(self._seconds)
            yield batch

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def build_loaders(manifest, **kwargs):
    seconds = float(kwargs.pop("sleep_per_batch", 0))
    if seconds < 0:
        raise ValueError(f"sleep_per_batch={seconds} must not be negative")
    loaders = digits.build_loaders(manifest, **kwargs)
    if seconds == 0:
        return loaders
    return (_Slowed(loaders[0], seconds), *loaders[1:])
