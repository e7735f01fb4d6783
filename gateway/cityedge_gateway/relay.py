"""Relaying downstream nodes' signed batches: verify, then forward the exact bytes.

A MicroPython node signs its own batches; the gateway must not re-sign them (integrity is
end to end, node to ingest). ``NodeRelay`` is the one place that decides whether a node's
batch is accepted for forwarding, using the core's ``BatchVerifier`` with the node keys
from the config:

- ``ok``, ``gap``, ``reordered``, ``fork``: accepted; stored unchanged and forwarded
  (a gap or fork is still the node's real data; the ingest sees and reports it too).
- ``duplicate``: already stored (the node re-sent after a lost acknowledgement); the node
  is acknowledged again, nothing is stored twice.
- ``replay``, ``bad_signature``, ``unknown_key``, ``malformed``: rejected and counted
  against the node the transport says sent it (``failures``), so status can name it.

A batch must also name the node it arrived from (the topic or link identity): a node's key
cannot be used to inject batches under another node's link. The nodes' chain states are
kept in the store and written in the same transaction as the batches (``Store.commit``),
so a replay is still recognised after the gateway restarts. The fleet applies its own
rule on top: it takes a node's relayed batches only from the gateway the node is
registered with (``gateway_id``), and refuses batches it could not store (the core's
SenML bounds, which this relay's ``BatchVerifier`` applies too: such a batch is
``malformed`` here already).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cityedge_core import batch, chain, cose
from cityedge_core.chain import BatchVerifier, ChainState, KeyEntry
from cityedge_core.errors import PeerError
from cityedge_host import fastcbor
from cityedge_host.crypto import EcVerifier

from .store import Relayed, Store

FORWARD = "forward"  # store and forward the bytes, then acknowledge the node
ACK_ONLY = "ack"  # already stored: acknowledge, store nothing
REJECT = "reject"  # counted as a failure of the node; not acknowledged


@dataclass
class Decision:
    action: str
    status: str
    reason: str = ""
    relayed: Relayed | None = None


@dataclass
class NodeStats:
    accepted: int = 0
    duplicates: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # verdict status -> count


class NodeRelay:
    def __init__(self, nodes: dict[str, EcVerifier], store: Store) -> None:
        keyring = {v.kid: KeyEntry(device, v) for device, v in nodes.items()}
        self.store = store
        self.verifier = BatchVerifier(keyring, self._load_states(), decode=fastcbor.loads)
        self.stats: dict[str, NodeStats] = {device: NodeStats() for device in nodes}
        self.dirty: set[str] = set()

    def _load_states(self) -> dict[str, ChainState]:
        return {d: ChainState.from_bytes(b) for d, b in self.store.node_states().items()}

    def check(self, link_device: str, data: bytes) -> Decision:
        """Decide about one batch that arrived from ``link_device``."""
        stats = self.stats.setdefault(link_device, NodeStats())
        owner = self._key_owner(data)
        if owner is not None and owner != link_device:
            # Signed with another node's key but sent over this node's link: refused
            # before the chain state of the other node is touched.
            stats.failures["wrong_link"] += 1
            return Decision(REJECT, "wrong_link", "signed with the key of %s" % owner)
        verdict = self.verifier.check(data)
        if verdict.status == chain.DUPLICATE:
            stats.duplicates += 1
            return Decision(ACK_ONLY, verdict.status)
        if not verdict.accepted:
            stats.failures[verdict.status] += 1
            return Decision(REJECT, verdict.status, verdict.reason)
        b = verdict.batch
        readings = len(b.records) if b.kind == batch.KIND_READINGS else 0
        stats.accepted += 1
        self.dirty.add(b.device)
        return Decision(FORWARD, verdict.status, "", Relayed(b.device, b.seq, readings, data))

    def _key_owner(self, data: bytes) -> str | None:
        """The node whose key the envelope names (no signature check: a cheap peek)."""
        try:
            kid = cose.decode_sign1(data).kid
        except PeerError:
            return None  # the verifier reports it as malformed
        entry = self.verifier.keyring.get(kid) if kid is not None else None
        return entry.device if entry is not None else None

    def take_states(self) -> dict[str, bytes]:
        """Chain states changed since the last commit, to store with the batches."""
        out = {d: self.verifier.states[d].to_bytes() for d in self.dirty}
        self.dirty.clear()
        return out

    def rollback(self) -> None:
        """The commit failed: forget what was verified since the last one."""
        self.verifier.states = self._load_states()
        self.dirty.clear()

    def commit(self, decisions: list[Decision]) -> None:
        """Store the forwarded batches and the chain states durably (raises StorageError)."""
        relayed = [d.relayed for d in decisions if d.relayed is not None]
        try:
            self.store.commit(relayed=relayed, node_states=self.take_states())
        except Exception:
            self.rollback()
            raise
