"""The distribution grammar of the simulator's field flags (`--latency`, `--bandwidth`, `--speed`) and its draws.

A spec is one of::

    X                        always X
    uniform:LO:HI            uniform between LO and HI
    lognormal:MEDIAN:SIGMA   log-normal with that median (e^mu) and log-space spread SIGMA: a long right tail
    straggler:BASE:P:FACTOR  BASE, except a share P of draws is BASE * FACTOR (P=0.1, FACTOR=10: a 10x tail)

Numbers are finite decimals; each flag also bounds its values (`parse_dist`'s ``positive``: bandwidth must be above
zero, latency and training time may be zero). Owns the parsing, its one-line errors and the draws; who draws
how often (per message, per peer) is `quinkgl_cli.sim.field`'s.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from quinkgl_cli.errors import UsageError

GRAMMAR = "X | uniform:LO:HI | lognormal:MEDIAN:SIGMA | straggler:BASE:P:FACTOR"
_ARITY = {"uniform": 2, "lognormal": 2, "straggler": 3}


@dataclass(frozen=True)
class Dist:
    kind: str  # fixed | uniform | lognormal | straggler
    args: tuple[float, ...]
    spec: str

    def draw(self, rng: random.Random) -> float:
        a = self.args
        if self.kind == "fixed":
            return a[0]
        if self.kind == "uniform":
            return rng.uniform(a[0], a[1])
        if self.kind == "lognormal":
            return a[0] * math.exp(rng.gauss(0.0, a[1]))
        return a[0] * a[2] if rng.random() < a[1] else a[0]

    @property
    def constant(self) -> bool:
        """Whether every draw gives the same value (no random number is consumed then either)."""
        return self.kind == "fixed"


def parse_dist(flag: str, spec: str, unit: str, positive: bool = False) -> Dist:
    """``spec`` for ``flag`` (values in ``unit``), or a `UsageError` naming the flag, the value and the grammar."""
    hint = f"use {GRAMMAR} ({unit})"
    parts = spec.strip().split(":")
    kind = parts[0].lower() if len(parts) > 1 else "fixed"
    values = parts[1:] if len(parts) > 1 else parts
    if kind != "fixed" and kind not in _ARITY:
        raise UsageError(f"{flag} {spec!r}: unknown distribution {parts[0]!r}", hint)
    want = _ARITY.get(kind, 1)
    if len(values) != want:
        raise UsageError(f"{flag} {spec!r}: {kind} takes {want} number{'s' if want > 1 else ''}", hint)
    try:
        args = tuple(float(v) for v in values)
    except ValueError:
        raise UsageError(f"{flag} {spec!r}: not a number", hint) from None
    if not all(math.isfinite(x) for x in args):
        raise UsageError(f"{flag} {spec!r}: numbers must be finite", hint)
    problem = _bounds(kind, args, positive)
    if problem:
        raise UsageError(f"{flag} {spec!r}: {problem}", hint)
    return Dist(kind, args, spec)


def _bounds(kind: str, a: tuple[float, ...], positive: bool) -> str | None:
    least = "above 0" if positive else "0 or more"
    low_ok = (lambda x: x > 0) if positive else (lambda x: x >= 0)
    if kind == "fixed" and not low_ok(a[0]):
        return f"the value must be {least}"
    if kind == "uniform" and not (low_ok(a[0]) and a[0] <= a[1]):
        return f"needs {least} for LO and LO <= HI"
    if kind == "lognormal" and not (a[0] > 0 and a[1] >= 0):
        return "needs MEDIAN above 0 and SIGMA 0 or more"
    if kind == "straggler" and not (low_ok(a[0]) and 0 <= a[1] <= 1 and a[2] > 0):
        return f"needs BASE {least}, P between 0 and 1 and FACTOR above 0"
    return None
