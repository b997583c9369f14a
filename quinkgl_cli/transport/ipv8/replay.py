"""Replay protection for signed datagrams: IPv8 checks who signed a packet, never whether it was seen before.

Every signed message of ours carries the sender's session (fixed for one start, larger on every restart) and a
counter (one more for each message it signs). A receiver admits a message once: a session older than the newest
one it has seen from that key is stale, and within a session a counter already admitted, or older than the last
``WINDOW`` counters, is a replay. The window lets datagrams that overtook each other through.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

WINDOW = 256
_MASK = (1 << WINDOW) - 1


@dataclass
class _Sequence:
    session: int
    highest: int
    seen: int  # bit i set: counter ``highest - i`` was admitted


class ReplayGuard:
    """Per sender key, the newest session and which recent counters were admitted.

    Senders are remembered after they are lost (least recently heard forgotten first, beyond ``capacity``), so a
    captured packet cannot bring back a peer that went away.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._senders: OrderedDict[bytes, _Sequence] = OrderedDict()
        self._capacity = capacity

    def admit(self, key: bytes, session: int, counter: int) -> bool:
        """True, and remembered, the first time ``(session, counter)`` comes from ``key``; False for a replay."""
        seq = self._senders.get(key)
        if seq is None or session > seq.session:
            self._senders[key] = _Sequence(session, counter, 1)
            self._senders.move_to_end(key)
            while len(self._senders) > self._capacity:
                self._senders.popitem(last=False)
            return True
        if session < seq.session:
            return False
        if counter > seq.highest:
            shift = counter - seq.highest
            seq.seen = ((seq.seen << shift) | 1) & _MASK if shift < WINDOW else 1
            seq.highest = counter
        else:
            age = seq.highest - counter
            if age >= WINDOW or (seq.seen >> age) & 1:
                return False
            seq.seen |= 1 << age
        self._senders.move_to_end(key)
        return True
