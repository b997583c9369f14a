"""Updates that carry nothing new: a copy of a model another peer or this node sent, or a peer's model sent again
in a later round.

Owns the sha256 digests of the full-weight updates of the last ``window`` rounds: this node's own, and the first
sender and round of each one received. Keys cost nothing, so an identity can forward an honest peer's model (under a
squatted id, or any fresh one) and give that model a second weight in every aggregation, send a peer its own model
back (pulling it toward its past), or, never training, send one model round after round. Honest peers do not send
byte-equal updates (each shares after training on its own data, and an update's meta names its step and targets);
were two ever equal, keeping one loses nothing. The first copy to arrive is kept, whoever sent it: the content is
aggregated once either way. Compressed updates (deltas against each receiver's reconstruction) are not screened
here. Nothing is checkpointed: the digests are relearned from the next rounds.
"""

from __future__ import annotations

import hashlib
import math
import threading

OWN = ""  # the sender recorded for this node's own updates (no node id is empty)


def digest(payload: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(payload).digest()


class CopyGuard:
    def __init__(self, window: int) -> None:
        self.window = window
        self._first: dict[bytes, tuple[str, int]] = {}  # digest -> (first sender or OWN, its round)
        # No digest held is older than this round: `prune`, called for every update received, rebuilds the table
        # only when one is.
        self._oldest: float = math.inf
        self._lock = threading.Lock()  # a transport may deliver from its own thread while the driver shares

    def note_own(self, round_: int, payload: bytes | bytearray | memoryview) -> None:
        """This node sent ``payload`` in ``round_``."""
        key = digest(payload)
        with self._lock:
            if key not in self._first:
                self._first[key] = (OWN, round_)
                self._oldest = min(self._oldest, round_)

    def refusal(self, sender: str, round_: int, key: bytes) -> str | None:
        """Why an update of ``round_`` from ``sender`` whose payload has digest ``key`` carries nothing new, or None
        (it is then remembered). The same update again within its round (a resend, a later gossip step that found
        nothing to aggregate) is not refused: the inbox keeps one per sender."""
        with self._lock:
            first = self._first.get(key)
            if first is None:
                self._first[key] = (sender, round_)
                self._oldest = min(self._oldest, round_)
                return None
        who, seen_round = first
        if who == OWN:
            return f"echo of this node's round-{seen_round} model"
        if who != sender:
            return f"copy of {who}'s round-{seen_round} model"
        if round_ > seen_round:
            return f"replay of its round-{seen_round} model"
        return None

    def prune(self, current_round: int) -> None:
        """Forget digests more than ``window`` rounds older than ``current_round``."""
        oldest = current_round - self.window
        with self._lock:
            if self._oldest >= oldest:
                return
            self._first = {k: v for k, v in self._first.items() if v[1] >= oldest}
            self._oldest = min((v[1] for v in self._first.values()), default=math.inf)
