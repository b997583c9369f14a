"""The creator's revocation list, spread by gossip and enforced on the peer table.

Owns the spreading: a list adopted (newer than ours, signed by the manifest's creator for this swarm; see
`transport.admission`) is passed on to every peer at once, and every newly met peer is sent ours, so a new version
reaches the whole swarm in a few hops and a late joiner learns it on contact. Adopting a list drops the revoked
peers from the table at once (their node ids are freed, their offers refused from then on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from quinkgl_cli.events import emit
from quinkgl_cli.transport.admission import Admission
from quinkgl_cli.transport.common import DropLog
from quinkgl_cli.transport.ipv8.courier import Courier
from quinkgl_cli.transport.ipv8.payloads import RevocationPayload
from quinkgl_cli.transport.ipv8.peers import PeerRecord, PeerTable
from quinkgl_cli.transport.ipv8.settings import TransportSettings

log = logging.getLogger("quinkgl.transport")


class RevocationGossip:
    def __init__(self, settings: TransportSettings, admission: Admission, table: PeerTable, courier: Courier,
                 own_key: bytes, lose: Callable[[str, str], None], drops: DropLog) -> None:
        self.settings = settings
        self.admission = admission
        self.table = table
        self.courier = courier
        self.own_key = own_key
        self.lose = lose
        self.drops = drops
        self._own_revoked_said = False

    def on_message(self, rec: PeerRecord, p: RevocationPayload) -> None:
        """A list from a known peer (its freshness already checked)."""
        if p.swarm_id != self.settings.swarm_id:
            self.drops("revocations-refused", rec.node_id, "wrong_swarm")
            return
        verdict = self.admission.consider(p.body, rec.node_id)
        if verdict == "adopted":
            self._spread(exclude=rec.node_id)
        elif verdict != "known":
            self.drops("revocations-refused", rec.node_id, verdict)

    def share_with(self, rec: PeerRecord) -> None:
        body = self.admission.revocation_text()
        if body:
            self.courier.send(rec.address, RevocationPayload(self.settings.swarm_id, *self.courier.stamp(), body))

    def tick(self) -> None:
        """The operator's file changed to a newer list: enforce and spread it."""
        if self.admission.poll():
            self._spread(exclude=None)

    def _spread(self, exclude: str | None) -> None:
        self.enforce()
        for rec in self.table:
            if rec.node_id != exclude:
                self.share_with(rec)

    def enforce(self) -> None:
        for rec in self.table:
            if self.admission.revoked(rec.key_bin):
                self.lose(rec.node_id, "revoked")
        if self.admission.revoked(self.own_key) and not self._own_revoked_said:
            self._own_revoked_said = True
            emit(log, logging.ERROR, "own-key-revoked", context={"node": self.settings.node_id},
                 version=self.admission.version, hint="peers refuse this node from now on: it stops before its next round; ask the swarm's creator")
