"""A fast device on CPython: the real protocol (the shared core's batches, commands, results
and key rotation) over real mTLS MQTT (aiomqtt), cheap enough to run a thousand in one
process (asyncio), for campaigns and benches that the unix-port firmware is too slow for.

What it does, as a device does:

- **streams** a signed batch (``cityedge_core.batch.BatchWriter``, the host's OpenSSL
  signer) every ``interval_s`` on ``ce/v1/<id>/up/readings`` at QoS 1; a batch stays in
  the outbox until the broker acknowledged it, and is sent again after a reconnect (the
  chain classifies a second copy as a duplicate: nothing is lost);
- **obeys signed commands** on ``down/cmd`` through the core's gate, the one every device
  uses (``cityedge_core.command_gate``): the exact envelope form, a trusted fleet kid and
  its signature, a map whose target is this device, not expired, and a seq above the last
  one taken (persisted before the command runs). Each authentic command is answered with a
  signed result (``command.encode_result``) on ``up/result``; a seq answered before is
  answered again with the same bytes (the fleet re-sends when an answer was lost);
- **rotates its key** (``cityedge_core.rotation``) with two key slots on disk:
  ``slot0.key``/``slot0.crt`` and ``slot1.key``/``slot1.crt``, the file ``current``
  naming the slot in use, ``state.json`` the last command seq and the pending rotation.
  Every file is written atomically (``cityedge_host.files.write_atomic``) and the
  ``current`` pointer last, so at any cut the device has a key whose certificate the fleet
  issued: ``rotate`` makes a key in the other slot and sends the CSR proven by the current
  key; ``install-cert`` checks the certificate holds the pending key, stores it, answers
  ``ok``, moves the pointer and reconnects with the new key and certificate, signing the
  next batch with it (its ``prev`` is the last batch under the old key; with
  ``prove_at_once`` that batch is signed at the switch, not at the next sampling time,
  so the fleet's proof does not wait an interval); ``erase-key``
  deletes the named key only if it is not the current one.
- **takes the fleet's new command keys** (``trust-update``) when provisioned with the
  fleet's root certificate: ``cityedge_host.fleet_trust``, as the Pi gateway does (the
  installed statement is kept in ``state.json``);
- **answers ``update``** (``cityedge.fastdevice_ota``): fetches and checks the release the
  command names, downloads the artifact in Range requests through ``ArtifactHasher`` and
  reports a signed result with its state (no install).

``provision(directory, ...)`` gives a device its identity (a key and chain the fleet
issued, the CA, the fleet's command keys, optionally the root certificate);
``FastDevice.load(directory, ...)`` opens it; ``run()`` streams until ``stop()``.
Counters in ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cityedge_core import batch as batchmod
from cityedge_core import (
    command,
    csr,
    rotation,
    senml,
    topics,
    trust_statement,
    update_manifest,
)
from cityedge_core.command_gate import CommandGate, CommandRefused
from cityedge_core.errors import PeerError
from cityedge_host.backoff import Backoff
from cityedge_host.command_responder import Refuse
from cityedge_host.crypto import EcSigner, EcVerifier, load_signer, public_sec1
from cityedge_host.files import write_atomic
from cityedge_host.fleet_trust import FleetTrust, VersionMark
from cityedge_host.mqtt_client import FailFastClient

log = logging.getLogger(__name__)
ANSWERS_KEPT = 16  # results kept to answer a re-sent command again with the same bytes
# seconds: the wait after a failed connect, doubling from the first to the longest (each
# scaled by a random 50-150 %, ``Backoff``): the gateway's (``limits.MQTT_BACKOFF_MIN_S`` ..
# ``_MAX_S``) and a board's (``cityedge_fw.mqtt_async._BACKOFF_MIN_MS`` .. ``_MAX_MS``,
# 50-100 %), so a simulated herd hits a broker coming back as hard as a real fleet would,
# not harder (docs/CAPACITY.md: the herd on the RabbitMQ cluster)
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 60.0
CONNECT_TIMEOUT_S = 10.0


class _GateState:
    """The gate's ``cmd_seq`` in the device's ``state.json`` (written before a command
    runs: a power cut cannot make it run twice)."""

    def __init__(self, device: FastDevice) -> None:
        self.device = device

    def get(self, key: str, default: Any = None) -> Any:
        return self.device.state.get(key, default)

    def set(self, **values: Any) -> None:
        self.device.state.update(values)
        self.device._save_state()


@dataclass
class FastStats:
    connects: int = 0
    connect_failures: int = 0
    last_error: str = ""
    signed: int = 0  # batches signed
    published: int = 0  # batches the broker acknowledged
    results: int = 0  # results published
    refused: int = 0  # commands refused (authentic, not for now)
    forged: int = 0  # commands whose envelope, key or signature was refused
    rotations: int = 0  # certificates installed (key switches)
    erased: int = 0  # old keys erased
    commands: list[str] = field(default_factory=list)  # names taken, in order


class _CoreKey:
    """A host signer in the shape ``csr.build_csr`` wants (``public_key().to_sec1()``)."""

    def __init__(self, signer: EcSigner) -> None:
        self.signer = signer

    def public_key(self) -> _CoreKey:
        return self

    def to_sec1(self) -> bytes:
        return public_sec1(self.signer.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signer.sign(message)


def remove(path: Path) -> None:
    """Delete a file if it is there (the one place files are removed: a test cuts the power
    here as it does in ``write_atomic``)."""
    path.unlink(missing_ok=True)


def _root_verifier(pem: str | None) -> EcVerifier | None:
    """The offline root's key from its certificate (None: not given)."""
    if not pem:
        return None
    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the root certificate's key is not an EC key")
    return EcVerifier(key)


def _pem(der: bytes) -> str:
    return csr.pem("CERTIFICATE", der)


class _ProvisionState:
    """``state.json`` as ``FleetTrust`` reads and writes it before the device first runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(self.path.read_text()).get(key, default)

    def set(self, **values: Any) -> None:
        state = json.loads(self.path.read_text())
        state.update(values)
        write_atomic(self.path, json.dumps(state).encode(), 0o600)


def version_mark(directory: Path) -> VersionMark:
    """The device's trust version mark (``fleet_trust.VersionMark``) beside its state."""
    return VersionMark(directory / "trust-version")


def provision(directory: Path, *, device_id: str, signer: EcSigner, chain_pem: str,
              ca_pem: str, fleet_keys: list[str], root_pem: str | None = None,
              statement: str | None = None, clock: Any = time.time) -> Path:
    """Give a device directory its first identity (slot 0): key, chain (leaf first), the
    CA bundle it trusts for the broker, the fleet's command keys (SEC1 hex) and, to take
    ``trust-update``, the fleet's offline root certificate (PEM). ``statement``: the
    enrollment answer's (base64), installed with a ``trust-update``'s checks at ``clock``
    (``FleetTrust.install_enrolled``); refused: ``EnrollmentTrustError`` and the
    directory holds no identity (``current`` is written last, only after it)."""
    batchmod.check_device_id(device_id)
    directory.mkdir(parents=True, exist_ok=True)
    leaf_end = chain_pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    write_atomic(directory / "identity.json", json.dumps(
        {"device_id": device_id, "fleet_keys": fleet_keys, "root_pem": root_pem,
         "chain_tail": chain_pem[leaf_end:].strip() + "\n"}).encode(), 0o644)
    write_atomic(directory / "ca.pem", ca_pem.encode(), 0o644)
    write_atomic(directory / "slot0.key", signer.private_pem(), 0o600)
    write_atomic(directory / "slot0.crt", chain_pem.encode(), 0o644)
    write_atomic(directory / "state.json", json.dumps({"cmd_seq": 0}).encode(), 0o600)
    remove(version_mark(directory).path)  # a new enrollment: the new seed, as on a board
    if statement:
        trust = FleetTrust([EcVerifier.from_sec1(bytes.fromhex(k)) for k in fleet_keys],
                           _root_verifier(root_pem), _ProvisionState(directory / "state.json"),
                           lambda: int(clock()), version_mark(directory))
        log.info("%s: %s", device_id, trust.install_enrolled(statement))
    write_atomic(directory / "current", b"0", 0o644)
    return directory


class FastDevice:
    """One device (module docstring). Not thread-safe: one asyncio loop."""

    # the MQTT client class (a bench of thousands swaps in a lighter one: ``bench.city``)
    mqtt_client: type[aiomqtt.Client] = FailFastClient

    def __init__(self, directory: Path, host: str, port: int, *, interval_s: float = 1.0,
                 readings: int = 10, clock: Any = time.time,
                 chain: tuple[int, bytes] | None = None, prove_at_once: bool = False) -> None:
        self.dir = directory
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.readings = readings
        self.clock = clock
        # True: the first batch under a new key is signed as the key switches, not at the
        # next sampling time (the fleet's proof, and so the old certificate's revocation,
        # comes a sampling interval sooner: a campaign's waves need not wait for it)
        self.prove_at_once = prove_at_once
        ident = json.loads((directory / "identity.json").read_text())
        self.id: str = ident["device_id"]
        self.chain_tail: str = ident["chain_tail"]
        self.state: dict[str, Any] = json.loads((directory / "state.json").read_text())
        root = _root_verifier(ident.get("root_pem"))
        # the fleet keys it obeys: the seed, until a statement of the root replaces them
        self.fleet_keys = FleetTrust(
            [EcVerifier.from_sec1(bytes.fromhex(k)) for k in ident["fleet_keys"]], root,
            _GateState(self), lambda: int(self.clock()), version_mark(directory))
        self.slot = int((directory / "current").read_text())
        self.signer = load_signer(self._path(self.slot, "key"))
        # the chain's position (seq, head) is kept in memory only: a board keeps it in its
        # ring buffer; a test that cuts the power hands it over (``chain``)
        seq, head = chain or (0, batchmod.ZERO_HASH)
        self.writer = batchmod.BatchWriter(self.id, self.signer, self.signer.kid, seq, head)
        self.outbox: list[bytes] = []  # signed, not acknowledged yet (oldest first)
        self.answers: OrderedDict[int, bytes] = OrderedDict()
        self.stats = FastStats()
        self.boot = 1
        self.sampling = True  # False: sign nothing more (what is signed is still sent)
        self._client: aiomqtt.Client | None = None
        self._switch = asyncio.Event()  # set: reconnect with the current slot
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tls: tuple[tuple[int, ...], ssl.SSLContext] | None = None  # tls_context()
        from cityedge.fastdevice_ota import FastUpdater

        self.updater = FastUpdater(self)

    # -- files --------------------------------------------------------------------------

    def _path(self, slot: int, kind: str) -> Path:
        return self.dir / ("slot%d.%s" % (slot, kind))

    def _save_state(self) -> None:
        write_atomic(self.dir / "state.json", json.dumps(self.state).encode(), 0o600)

    def key_slots(self) -> dict[int, str]:
        """Slot -> kid (hex) of every key on disk."""
        return {s: load_signer(self._path(s, "key")).kid.hex() for s in (0, 1)
                if self._path(s, "key").exists()}

    def tls_context(self) -> ssl.SSLContext:
        """The current slot's key and certificate and the CA, as a TLS context: built once
        and reused by every reconnect until one of those files is replaced (a rotation
        switches to the other slot's files; ``write_atomic`` gives a rewritten file a new
        inode). A build
        reads and parses three PEM files (0.9 ms): a herd of 10,000 devices rebuilding
        theirs at every attempt spent seconds of the one loop on it."""
        crt, key, ca = (self._path(self.slot, "crt"), self._path(self.slot, "key"),
                        self.dir / "ca.pem")
        mark = tuple(x for st in (crt.stat(), key.stat(), ca.stat())
                     for x in (st.st_ino, st.st_mtime_ns))
        if self._tls is None or self._tls[0] != mark:
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(crt), str(key))
            self._tls = (mark, ctx)
        return self._tls[1]

    # -- readings -----------------------------------------------------------------------

    def sign_batch(self) -> bytes:
        t0 = float(int(self.clock()))
        recs: list[dict[int, Any]] = [{senml.BN: self.id + ":", senml.BT: t0,
                                       senml.N: "pm25", senml.U: "ug/m3", senml.V: 1.5}]
        recs += [{senml.N: "pm25", senml.T: float(i), senml.V: 1.5 + i}
                 for i in range(1, self.readings)]
        data = self.writer.sign(recs, boot=self.boot)
        self.stats.signed += 1
        self.outbox.append(data)
        self._wake.set()
        return data

    # -- commands -----------------------------------------------------------------------

    def check(self, data: bytes) -> tuple[str, int, Any]:
        """The core gate's verdict: ``(name, seq, args)`` or a ``PeerError``
        (``CommandRefused`` for an authentic one that is not for now)."""
        return CommandGate(self.id, self.fleet_keys, _GateState(self),
                           lambda: int(self.clock())).check(data)

    async def on_command(self, data: bytes) -> None:
        try:
            name, seq, args = self.check(data)
        except CommandRefused as e:  # authentic; name and seq when it is for this device
            old = self.answers.get(e.seq) if e.replay and e.seq is not None else None
            if old is not None:
                await self._publish_result(old)  # the same answer again
                return
            self.stats.refused += 1
            if e.seq is not None and e.name is not None:
                await self._answer(e.name, e.seq, command.REFUSED, str(e))
            return
        except PeerError as e:
            self.stats.forged += 1
            log.info("%s: command refused: %s", self.id, e)
            return
        self.stats.commands.append(name)
        result_data: Any = None
        try:
            if name == update_manifest.UPDATE:
                after = None
                outcome, detail, result_data = await self.updater.update(args)
            else:
                outcome, detail, after = await self._run(name, args)
        except PeerError as e:
            outcome, detail, after = command.REFUSED, str(e), None
        except OSError as e:
            outcome, detail, after = command.FAILED, str(e), None
        await self._answer(name, seq, outcome, detail, result_data)
        if after is not None:
            after()

    async def _run(self, name: str, args: Any) -> tuple[str, str, Any]:
        if name == rotation.ROTATE:
            return await self._rotate(rotation.rotate_args(args))
        if name == rotation.INSTALL_CERT:
            rid, der = rotation.install_cert_args(args)
            return self._install(rid, der)
        if name == rotation.ERASE_KEY:
            rid, kid = rotation.erase_key_args(args)
            return self._erase(rid, kid)
        if name == "status":
            return command.OK, "seq %d, slot %d" % (self.writer.seq, self.slot), None
        if name == trust_statement.TRUST_UPDATE:
            try:
                done = await self.fleet_keys.trust_update(args)
            except Refuse as e:
                return command.REFUSED, str(e), None
            return command.OK, done.detail, None
        return command.REFUSED, "unknown command %s" % name, None

    async def _answer(self, name: str, seq: int, outcome: str, detail: str,
                      result_data: Any = None) -> None:
        data = command.encode_result(self.signer, self.signer.kid, name, self.id, seq,
                                     outcome, detail, result_data)
        self.answers[seq] = data
        while len(self.answers) > ANSWERS_KEPT:
            self.answers.popitem(last=False)
        await self._publish_result(data)

    async def _publish_result(self, data: bytes) -> None:
        client = self._client
        if client is None:
            return  # not connected: the fleet sends the command again, we answer again
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topics.up(self.id, topics.RESULT), data, qos=1)
            self.stats.results += 1

    # -- rotation -----------------------------------------------------------------------

    async def _rotate(self, rid: int) -> tuple[str, str, Any]:
        other = 1 - self.slot
        new = EcSigner.generate()
        remove(self._path(other, "crt"))  # a stale certificate goes first
        write_atomic(self._path(other, "key"), new.private_pem(), 0o600)
        self.state["pending"] = {"rotation": rid, "slot": other}
        self._save_state()
        der = csr.build_csr(_CoreKey(new), self.id)
        msg = rotation.csr_message(self.signer, self.signer.kid, self.id, rid, der)
        client = self._client
        if client is None:
            raise OSError("not connected")
        try:
            await client.publish(topics.up(self.id, topics.CSR), msg, qos=1)
        except aiomqtt.MqttError as e:
            raise OSError("CSR not sent: %s" % e) from e
        return command.OK, "csr sent for key %s" % new.kid.hex(), None

    def _install(self, rid: int, der: bytes) -> tuple[str, str, Any]:
        pending = self.state.get("pending") or {}
        if pending.get("rotation") != rid:
            raise CommandRefused("install-cert: rotation %d is not pending here" % rid)
        slot = int(pending["slot"])
        new = load_signer(self._path(slot, "key"))
        if not rotation.cert_holds_key(der, public_sec1(new.public_key)):
            raise CommandRefused("install-cert: the certificate is not for the pending key")
        write_atomic(self._path(slot, "crt"), (_pem(der) + self.chain_tail).encode(), 0o644)
        # the switch is on disk before the ok goes out: a device that said ok and was cut
        # would otherwise come back on the old key, and the fleet would wait for a batch
        # under the new one for ever
        write_atomic(self.dir / "current", str(slot).encode(), 0o644)
        self.state.pop("pending", None)
        self._save_state()

        def switch() -> None:  # after the ok is sent, under the old key, on the old session
            self.slot, self.signer = slot, new
            self.writer.signer, self.writer.kid = new, new.kid
            self.stats.rotations += 1
            if self.prove_at_once and self.sampling:
                self.sign_batch()  # sent first on the new session
            self._switch.set()  # reconnect with the new key and certificate
            self._wake.set()  # the session ends at once, not at its next look

        return command.OK, "installed for key %s" % new.kid.hex(), switch

    def _erase(self, rid: int, kid: bytes) -> tuple[str, str, Any]:
        if kid == self.signer.kid:
            raise CommandRefused("erase-key: %s is the current key" % kid.hex())
        for slot, slot_kid in self.key_slots().items():
            if slot != self.slot and slot_kid == kid.hex():
                remove(self._path(slot, "key"))
                remove(self._path(slot, "crt"))
                self.stats.erased += 1
                return command.OK, "erased key %s" % kid.hex(), None
        return command.OK, "no key %s here (erased already)" % kid.hex(), None

    # -- the connection -----------------------------------------------------------------

    async def run(self) -> None:
        """Connect, stream and obey until ``stop()``; reconnects with backoff."""
        backoff = Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S)
        sampler = asyncio.create_task(self._sample())
        try:
            while not self._stop.is_set():
                self._switch.clear()
                try:
                    async with self.mqtt_client(self.host, self.port, identifier=self.id,
                                              tls_context=self.tls_context(), keepalive=30,
                                              timeout=CONNECT_TIMEOUT_S) as client:
                        self._client = client
                        self.stats.connects += 1
                        backoff.reset()
                        await client.subscribe(topics.down(self.id, topics.CMD), qos=1)
                        await self._session(client)
                except aiomqtt.MqttError as e:
                    self.stats.connect_failures += 1
                    self.stats.last_error = str(e)
                finally:
                    self._client = None
                if not self._switch.is_set() and not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), backoff.next())
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    async def _session(self, client: aiomqtt.Client) -> None:
        async def commands() -> None:
            async for message in client.messages:
                await self.on_command(bytes(message.payload))

        reader = asyncio.create_task(commands())
        try:
            while not (self._stop.is_set() or self._switch.is_set()):
                if reader.done():
                    reader.result()  # raises the connection's error
                    return
                if self.outbox:
                    await client.publish(topics.up(self.id, topics.READINGS), self.outbox[0],
                                         qos=1)
                    self.outbox.pop(0)
                    self.stats.published += 1
                    continue
                # nothing to send: sleep until a batch, a stop or a key switch sets _wake,
                # or the connection ends (no polling: thousands of devices share one loop)
                self._wake.clear()
                waker = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({waker, reader}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waker.cancel()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader

    async def _sample(self) -> None:
        while True:
            if self.sampling:
                self.sign_batch()
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

