"""Byzantine peers for the simulator: an honest node whose outgoing model is replaced on the way out.

The attacker trains and aggregates like everyone else; only what it shares is corrupted. The corruption is the
node's injected ``tamper`` policy: its exchange swaps the model's weights for the malicious ones while it encodes
and sends them and restores them afterwards, so they go through exactly the node's own send path (compression,
privacy, wire).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quinkgl_cli.errors import UsageError

# signflip: every shared weight negated and amplified by SIGNFLIP_FACTOR, so one attacker outweighs the honest
# models it is averaged with (a plain negation is mostly absorbed by an average);
# gaussian: weights replaced by N(0, GAUSSIAN_STD^2) noise; scale: weights multiplied by SCALE_FACTOR.
ATTACKS = ("signflip", "gaussian", "scale")
SIGNFLIP_FACTOR = 4.0
GAUSSIAN_STD = 1.0
SCALE_FACTOR = 100.0


def parse_attackers(text: str | None) -> tuple[int, str]:
    """``COUNT:KIND`` (e.g. ``4:signflip``) or ``COUNT`` (signflip) into (count, kind)."""
    if text is None or not text.strip():
        return 0, "signflip"
    count_text, _, kind = text.strip().partition(":")
    kind = kind.strip().lower() or "signflip"
    hint = f"write it as COUNT:KIND with KIND one of {', '.join(ATTACKS)} (e.g. 4:signflip)"
    try:
        count = int(count_text)
    except ValueError:
        raise UsageError(f"--attackers {text!r}: {count_text!r} is not a number of peers", hint) from None
    if count < 0:
        raise UsageError(f"--attackers {text!r}: the count must not be negative", hint)
    if kind not in ATTACKS:
        raise UsageError(f"--attackers {text!r}: unknown attack {kind!r}", hint)
    return count, kind


def corrupt(kind: str, flat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if kind == "signflip":
        return flat * -SIGNFLIP_FACTOR
    if kind == "gaussian":
        return torch.randn(flat.shape, generator=generator, dtype=torch.float32) * GAUSSIAN_STD
    if kind == "scale":
        return flat * SCALE_FACTOR
    raise ValueError(f"unknown attack {kind!r}")


def tamper_for(kind: str, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weights an attacker of ``kind`` sends in place of its honest ``flat`` ones (`NodePolicies.tamper`)."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    return lambda flat: corrupt(kind, flat, generator)
