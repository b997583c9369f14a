"""The creator's revocation list, spread by gossip and enforced on the peer table.

Owns the spreading: a list adopted (newer than ours, signed by the manifest's creator for this swarm; see
`transport.admission`) is passed on to every trusted peer at once, and every peer is sent ours once it is trusted,
so a new version reaches the whole swarm in a few hops and a late joiner learns it on contact (a seed's, a certified
peer's) or once it delivered a model. Only trusted peers: a list is tens of KB (38 KB for 512 keys), and a hello
from a forged source address, from a fresh key, had us send it there: 100 such hellos of 393 bytes drew 4.2 MB to
the forged address. A trusted peer's address is one the operator named, or one it proved (a model fetched over a
connection we opened); a certified peer's key needs a certificate, and joins the table only a few times a minute. Adopting a list drops the revoked
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
        self._told: set[tuple[bytes, int]] = set()  # (key, session) of the peers sent the list in force

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
        """Send ``rec`` the list in force, once per run of it, if it is trusted (see the module docstring)."""
        told = (rec.key_bin, rec.session)
        if not rec.trusted or told in self._told:
            return
        body = self.admission.revocation_text()
        if body:
            self._told.add(told)
            self.courier.send(rec.address, RevocationPayload(self.settings.swarm_id, *self.courier.stamp(), body))

    def tick(self) -> None:
        """The operator's file changed to a newer list: enforce and spread it. Peers that became trusted since the
        last tick are sent it."""
        if self.admission.poll():
            self._spread(exclude=None)
        if not self.admission.revocation_text():
            return
        self._told &= {(rec.key_bin, rec.session) for rec in self.table}
        for rec in self.table:
            self.share_with(rec)

    def _spread(self, exclude: str | None) -> None:
        self.enforce()
        self._told = {(rec.key_bin, rec.session) for rec in self.table if rec.node_id == exclude}
        for rec in self.table:
            self.share_with(rec)

    def enforce(self) -> None:
        for rec in self.table:
            if self.admission.revoked(rec.key_bin):
                self.lose(rec.node_id, "revoked")
        if self.admission.revoked(self.own_key) and not self._own_revoked_said:
            self._own_revoked_said = True
            emit(log, logging.ERROR, "own-key-revoked", context={"node": self.settings.node_id},
                 version=self.admission.version, hint="peers refuse this node from now on: it stops before its next round; ask the swarm's creator")
