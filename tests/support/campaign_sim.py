"""Many devices rotating in one process, through the real fleet's functions: the campaign
store and renewal start rotations, a stand-in for the command publisher records each due
command as delivered (the device is there) or absent (it is not: the broker's "no
subscribers"), and each device answers what it got as the protocol says — a CSR for a new
key proven by its current one, a signed ``ok``, the switch to the new key with a batch
that continues its chain, the erase — all fed to the real ``Ingestor`` (CSR rules, the CA
signing, the proof by the first batch, revocation). Real keys, CSRs, certificates,
signatures and database; no broker (the broker-level path is ``fastdevice``'s, in
``test_fleet_rotation_e2e``).

A device can be ``online`` or not, and ``refuse`` its rotate command (a broken or stolen
device: its rotation fails alone)."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from cityedge_core import batch as batchmod
from cityedge_core import command, topics
from cityedge_core import csr as corecsr
from cityedge_core import rotation as corerot
from cityedge_fleet import command_queue, rotation
from cityedge_fleet.config import Settings
from cityedge_fleet.ingest import Ingestor
from cityedge_fleet.models import Credential, Device, DeviceState, DeviceTag, FleetCommand
from cityedge_host.crypto import EcSigner, public_sec1

from support.fleet import records
from support.rotation import command_args

GROUP = 200  # messages per ingest transaction (the ingest's own group size)


class _Key:
    """An ``EcSigner`` as ``csr.build_csr`` wants a key."""

    def __init__(self, signer: EcSigner) -> None:
        self.signer = signer

    def public_key(self) -> _Key:
        return self

    def to_sec1(self) -> bytes:
        return public_sec1(self.signer.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signer.sign(message)


@dataclass
class SimDevice:
    id: str
    key: EcSigner  # the current key
    writer: batchmod.BatchWriter
    online: bool = True
    refuse: bool = False  # answers its rotate command "refused"
    pending: EcSigner | None = None  # the key a rotation made, until its certificate
    erased: list[str] = field(default_factory=list)  # kids of keys erased
    rotations: int = 0  # certificates installed

    def result(self, cmd: FleetCommand, outcome: str, detail: str = "") -> tuple[str, bytes]:
        return (topics.up(self.id, topics.RESULT),
                command.encode_result(self.key, self.key.kid, cmd.name, self.id, cmd.seq,
                                      outcome, detail))

    def batch(self) -> tuple[str, bytes]:
        return topics.up(self.id, topics.READINGS), self.writer.sign(records(2), boot=1)

    def answer(self, cmd: FleetCommand) -> list[tuple[str, bytes]]:
        """What the device publishes on getting ``cmd`` (its gate's checks are the firmware
        tests'; here every command is the fleet's own)."""
        args = command_args(cmd)
        if cmd.name == corerot.ROTATE:
            if self.refuse:
                return [self.result(cmd, "refused", "rotation not possible here")]
            rid = corerot.rotate_args(args)
            self.pending = EcSigner.generate()
            der = corecsr.build_csr(_Key(self.pending), self.id)
            csr = corerot.csr_message(self.key, self.key.kid, self.id, rid, der)
            return [(topics.up(self.id, topics.CSR), csr), self.result(cmd, "ok")]
        if cmd.name == corerot.INSTALL_CERT:
            _rid, der = corerot.install_cert_args(args)
            if self.pending is None or not corerot.cert_holds_key(
                    der, public_sec1(self.pending.public_key)):
                return [self.result(cmd, "failed", "certificate for another key")]
            out = [self.result(cmd, "ok")]
            self.key, self.pending = self.pending, None  # the slot pointer moves
            self.writer.signer, self.writer.kid = self.key, self.key.kid
            self.rotations += 1
            out.append(self.batch())  # the first batch under the new key: the proof
            return out
        if cmd.name == corerot.ERASE_KEY:
            _rid, kid = corerot.erase_key_args(args)
            if kid == self.key.kid:
                return [self.result(cmd, "refused", "that is the current key")]
            self.erased.append(kid.hex())
            return [self.result(cmd, "ok")]
        return [self.result(cmd, "refused", "unknown command")]


class SimFleet:
    """``n`` active devices in the fleet's database, and their stand-ins."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.ingest = Ingestor(engine, settings)
        self.devices: dict[str, SimDevice] = {}
        self.delivered = 0
        self.absent = 0
        self.device_s = 0.0  # seconds spent playing the devices (their keys, CSRs, signing)
        self.fleet_s = 0.0  # seconds in the fleet's functions (publisher stand-in, ingest)

    def add_devices(self, n: int, *, site: str = "harbour", model: str = "ce-air-1",
                    issued: dt.datetime, days: int = 90, first: int = 0,
                    tags: tuple[str, ...] = ()) -> list[str]:
        """Registered, active devices with a key and a credential issued at ``issued``
        (bulk-inserted: enrollment has its own tests)."""
        ids = []
        with Session(self.engine) as s:
            for i in range(first, first + n):
                dev = "urn:dev:mac:00ca%012x" % i
                key = EcSigner.generate()
                s.add(Device(id=dev, serial="CAMP-%d" % i, model=model,
                             hardware_class="esp32", site=site, state=DeviceState.active))
                s.flush()
                for tag in tags:
                    s.add(DeviceTag(device_id=dev, tag=tag))
                s.add(Credential(device_id=dev, serial="ca%030x" % i, kid=key.kid.hex(),
                                 public_key=public_sec1(key.public_key).hex(),
                                 not_before=issued,
                                 not_after=issued + dt.timedelta(days=days),
                                 cert_pem="(simulated enrollment)"))
                self.devices[dev] = SimDevice(dev, key,
                                              batchmod.BatchWriter(dev, key, key.kid))
                ids.append(dev)
            s.commit()
        return ids

    def publish(self, now: dt.datetime | None = None) -> list[FleetCommand]:
        """One publisher round without a broker: due commands of online devices are
        delivered, the others absent (tried again later). Returns the delivered ones."""
        now = now or dt.datetime.now(dt.UTC)
        out = []
        with Session(self.engine) as s:
            for cmd in command_queue.due(s, now, 10_000):
                dev = self.devices.get(cmd.device_id)
                here = dev is not None and dev.online
                wait = 60.0 if here else 30.0
                got = command_queue.record_try(s, cmd.id or 0, delivered=here, now=now,
                                               next_try_at=now + dt.timedelta(seconds=wait))
                if here and got is not None:
                    s.expunge(got)
                    out.append(got)
                    self.delivered += 1
                else:
                    self.absent += 1
            s.commit()
        return out

    def step(self, now: dt.datetime | None = None) -> int:
        """Deliver what is due and feed the devices' answers to the ingest; the number of
        commands delivered."""
        t0 = time.perf_counter()
        cmds = self.publish(now)
        t1 = time.perf_counter()
        msgs: list[tuple[str, bytes]] = []
        for cmd in cmds:
            msgs.extend(self.devices[cmd.device_id].answer(cmd))
        t2 = time.perf_counter()
        for i in range(0, len(msgs), GROUP):
            self.ingest.handle_many(msgs[i:i + GROUP])
        self.device_s += t2 - t1
        self.fleet_s += (t1 - t0) + (time.perf_counter() - t2)
        return len(cmds)

    def expire(self, now: dt.datetime) -> int:
        """What the publisher's round does first: commands past their expiry are
        ``expired``, and a rotation waiting for one fails (``rotation.on_answer``)."""
        with Session(self.engine) as s:
            gone = command_queue.expire_due(s, now)
            for cmd in gone:
                rotation.on_answer(s, cmd, "expired", "the fleet gave up after %d sends"
                                   % cmd.sends, actor="fleet")
            s.commit()
        return len(gone)

    def come_back(self, device_ids: Any, now: dt.datetime | None = None) -> None:
        """Devices back online: what the ingest does on their first batch after a silence
        (their unanswered commands due at once)."""
        for d in device_ids:
            self.devices[d].online = True
        with Session(self.engine) as s:
            command_queue.resend_now(s, list(device_ids), now or dt.datetime.now(dt.UTC))
            s.commit()
