"""The device agent: sample, sign, buffer on flash, forward over MQTT, report status.

Tasks (asyncio), all started by ``Agent.run``:

- **sampler** (in ``run``'s own task) reads every sensor each ``sample_interval_s``; a
  reading becomes a SenML record (CBOR labels). A sensor that fails is counted and
  reported in the status, never fatal. Every ``batch_readings`` records or
  ``batch_seconds`` seconds the records are signed as one batch (``BatchWriter``:
  COSE_Sign1 ES256, hash chain) and appended to the ring buffer; ``seq`` and the chain
  ``head`` are persisted after each batch. Only then is a reading "accepted": from here
  on it survives power cuts and outages.
- **forwarder** (every 200 ms) publishes the oldest stored batches (QoS 1, at most
  ``_INFLIGHT`` awaiting PUBACK) on ``<prefix>/<device>/up/readings`` and removes each from
  flash on its PUBACK. Each is read from flash into one reused buffer, which the MQTT
  client (``keep_inflight=False``) lets go of once the bytes are written to the socket:
  no payload stays in RAM until its PUBACK, nor through an outage. When the connection
  is lost the client forgets the unacknowledged ones; after the next CONNACK the
  forwarder starts again from the oldest batch on flash, in order. A batch whose PUBACK
  was lost goes out twice: the chain makes the copy a duplicate the fleet recognises.
- **status** (in the forwarder's task) publishes a signed status map on ``up/status``
  every ``status_interval_s``.
- **watchdog** (in ``run``'s own task) feeds the board's watchdog only while the sampler
  and the store are healthy, and ends the agent when another task has ended.
- the MQTT ``Link`` (``mqtt_async``) keeps the session up and delivers ``down/cmd`` and the
  retained ``down/desired`` messages to ``command_gate.CommandGate``.

One drop ledger, the agent's: every batch the ring buffer drops (the byte budget forces
the oldest out, or a file fails its CRC) comes through ``_on_drop`` before its file is
deleted; the agent tallies what is lost (``drops``: ``[first_seq, last_seq, batches,
readings]``, in ``State``) and, once the link is up, signs one drop record (``KIND_DROP``)
with the tally and forwards it like a batch: the fleet learns exactly what was lost, and
a long outage costs one drop record rather than one per batch. A power cut between the
tally and the deletion can over-count one append's worth, never under-count.
A batch sent and not yet acknowledged (``store.keep``: across reconnects, until a PUBACK
for it) may have reached the fleet: the ring buffer keeps it and drops the next oldest
instead, so no batch reaches the fleet and is also reported lost.

Timestamps: with a trusted clock (``board.unix_time()`` not None) a batch uses UNIX seconds
(``TIME_UNIX``), otherwise seconds since boot (``TIME_SINCE_BOOT``) with the boot counter;
a batch never mixes the two. ``time_scale`` > 1 runs the schedule faster (tests, soak):
times in the records are then simulated seconds since boot.

Memory (unix port, ROMFS, from ``tests/firmware``): see ``docs/ARCHITECTURE.md``. The
largest transient is a signature (pure-Python P-256: about 5 KB of big integers while it
runs), on top of one signed batch (about 35 bytes per reading) and the records being
collected; a TLS handshake (about 4 KB) can overlap it. A small heap fragments: the
MemoryErrors the agent can survive (a signature, a command's decoders, a status, a TLS
handshake) are counted in ``mem_errors`` and tried again later, losing nothing.
"""

import gc

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


import asyncio  # MicroPython 1.25+ (ROMFS): no ``uasyncio`` fallback, one name less

from cityedge_core import batch as batchmod
from cityedge_core import cbor, cose
from cityedge_core.errors import CityedgeError, PeerError, StorageError, text

from . import ON_DEMAND, VERSION, mqtt, unload
from .mqtt_async import Link, monotonic_ms, sleep_ms

# the settings the fleet may change at run time (``down/desired``) and their ranges: a
# tuple of ``settings``, a boot-only module (``main.build`` unloads it; the tuple stays)
from .settings import DESIRED

# SenML CBOR labels (RFC 8428 Table 6), as in ``cityedge_core.senml``; that module is
# not imported here to keep the receiver-side code off the device's heap.
_N = const(0)
_U = const(1)
_V = const(2)
_T = const(6)
_BT = const(-3)

_FORWARD_POLL_MS = const(200)  # ms between two forwarder rounds with nothing to send
_FORWARD_BUSY_MS = const(5)  # ms until the next round when the window was full
# QoS 1 batches awaiting PUBACK at once (their bytes are on flash, not in RAM: the client
# is made with ``keep_inflight=False``): two forward 10 batches a second on a local broker.
_INFLIGHT = const(2)
_UNHEALTHY_AFTER_SWEEPS = const(3)  # missed sampler sweeps before the watchdog is starved
_RECORD_BYTES = const(20)  # bytes per record the records buffer starts with (it can grow)
_SWEEP_READINGS = const(2)  # readings a sensor gives per sweep, for the records' headroom
_BATCH_OVERHEAD = const(160)  # bytes a signed batch adds to its records and device id
_COMMAND_TRIES = const(5)  # times a command is checked before a full heap drops it
_RETRY_MS = const(400)  # ms before a command's next try, times the tries so far
_DEFERRED_MAX = const(2)  # commands waiting for another try at most
# Messages of ``last_error``, one string constant (``errors.text``): on a device each
# string constant over 10 characters is an object of its own on the heap. Those set when
# a heap had no room stay constants of their own: cutting one out needs heap.
_TEXTS = const("sensor %s: %s|mqtt: subscription refused by the broker|command refused: %s|"
               "forwarder: %s|sampler: %s")
_M_SENSOR = const(0)
_M_SUBSCRIBE = const(1)
_M_REFUSED = const(2)
_M_FORWARDER = const(3)
_M_SAMPLER = const(4)


# The status map's keys (``Agent.status_cbor``), CBOR-encoded (a text string under 24 bytes
# is a head byte, 0x60 + its length, then its UTF-8) and in their deterministic order (RFC
# 8949 §4.2.1: shorter first, then bytewise): one bytes constant, one object on the heap,
# where 17 string constants were 8 objects (those over 10 characters) and 9 names
_STATUS_KEYS = const(b"\x62fw" b"\x63seq" b"\x64boot" b"\x65board" b"\x65drops"
                      b"\x66device" b"\x66update" b"\x68readings" b"\x68uptime_s"
                      b"\x69heap_free" b"\x6alast_error" b"\x6amem_errors"
                      b"\x6cbuffer_bytes" b"\x6dbuffer_budget" b"\x6dmqtt_connects"
                      b"\x6dsensor_faults" b"\x6ebuffer_batches")
_STATUS_PAIRS = const(17)

# ``Agent.topics``, by index
_T_READINGS = const(0)
_T_STATUS = const(1)
_T_CMD = const(2)
_T_DESIRED = const(3)


class Agent:
    """One device: ``board`` (HAL), its signing ``key`` (``p256.PrivateKey``), the ring
    buffer ``store``, the ``state`` file, ``settings`` as ``settings.check`` returns
    them (every key present and in range), the TLS context and broker address. ``topics``:
    its ``(up/readings, up/status, down/cmd, down/desired)`` (``topics.device_topics``
    under the configuration's ``topic_prefix``: ``main.build``; default: the core's
    prefix)."""

    def __init__(self, board, device, key, kid, store, state, settings, host,
                 port, ssl_ctx=None, server_hostname=None, fleet_keys=None,
                 sensors=None, topics=None):
        # 29 attributes: MicroPython's instance dict then is one 464-byte block, with a
        # 30th it is re-made as 592 bytes in one piece (a reboot into a fragmented heap
        # has been refused that); derive a value or keep it in a tuple before adding one
        self.board = board
        self.device = device
        if topics is None:  # a test's agent: the core's prefix
            from cityedge_core.topics import device_topics

            topics = device_topics(device)
        self.topics = topics
        self.store = store
        self.state = state
        # the one drop ledger (``_on_drop``); ``store.keep`` holds the batches handed to
        # MQTT and not yet acknowledged, on any connection: the fleet may have them, so the
        # ring buffer drops them last
        store.on_drop = self._on_drop
        self._fold_reporting()
        self.cfg = settings
        desired = state.get("desired")
        if isinstance(desired, dict):
            self.apply_desired(desired, persist=False)
        self.sensors = sensors if sensors is not None else board.sensors(self.cfg)
        self.boot = state.get("boot", 0) + 1
        state.set(boot=self.boot)
        # the chain: seq/head from State; if a power cut hit between the append and the
        # state write, the newest stored batch is ahead of State and is the true head
        seq = state.get("seq", 0)
        head = state.get("head", batchmod.ZERO_HASH)
        if store.newest > seq:
            last = store.next_after(store.newest - 1)  # that one file, not all
            if last is not None:
                seq, head = last[0], batchmod.batch_hash(last[1])
                state.set(seq=seq, head=head)
            last = None
        self.writer = batchmod.BatchWriter(device, key, kid, seq, head)
        # readings encoded as taken (~15-20 B each), in one buffer reused batch after batch
        # (and room for one more sweep: a seal may have to wait, ``seal``)
        self.records = batchmod.RecordBuffer((self.cfg["batch_readings"] + len(self.sensors) *
                                              _SWEEP_READINGS) * _RECORD_BYTES)
        # every batch forwarded is read from flash into this one buffer (while it fits):
        # a heap that streaming has cut into small pieces may have no fresh block its size
        self._fwd = bytearray(self._fwd_bytes())
        self._bt = 0
        self.batch_started_ms = None
        self.batch_timebase = None
        self.readings_total = 0
        self.sensor_faults = 0
        self.drops_total = 0
        self.last_error = None
        self.last_sweep_ms = 0
        self.store_ok = True
        self.batches_signed = 0
        self.commands_accepted = 0
        self.mem_errors = 0  # MemoryErrors the agent caught and survived (status: mem_errors)
        # [(payload, tries, not before ms)]: commands that met a heap with no room
        self._deferred = []
        self.published = 0
        self._pid_seq = {}  # MQTT packet id -> batch seq in flight
        # [the client's connection (``sessions``), the highest seq handed to it on that one]
        self._sent = [0, 0]
        client = mqtt.Client(device, self.cfg["keepalive_s"], True, None, _INFLIGHT,
                             keep_inflight=False)
        self.link = Link(client, host, port, ssl_ctx, server_hostname,
                         self._on_event, self._on_connect, monotonic_ms)
        self.fleet_keys = fleet_keys or {}

    # --- buffers ---------------------------------------------------------------------
    def _fwd_bytes(self):
        """Size of the forwarder's read buffer: the largest batch the records buffer
        makes fits (COSE envelope, chain fields and device id: 146 bytes + the id)."""
        return len(self.records.data) + _BATCH_OVERHEAD + len(self.device)

    # --- time -------------------------------------------------------------------------
    def sim_ms(self):
        """Milliseconds since boot on the (possibly accelerated) schedule clock."""
        return self.link.clock() * self.cfg["time_scale"]

    def sleep_sim(self, ms):
        """Awaitable: ``ms`` milliseconds of the schedule clock (no coroutine frame)."""
        return sleep_ms(max(1, ms // self.cfg["time_scale"]))

    # --- sampling and batches -----------------------------------------------------------
    def sweep(self):
        """Read every sensor once; returns the number of readings taken.

        A seal that had to wait (no heap for the signature) goes first;
        if it still cannot, and the records buffer has no room left, the sweep is skipped
        rather than the buffer grown in a heap that just had no room (the seal counted a
        MemoryError; three skipped sweeps in a row starve the watchdog: the board resets).
        """
        # (timebase, seconds) for the readings taken now
        t = self.board.unix_time() if self.cfg["time_scale"] == 1 else None
        if t is None:
            timebase, t = batchmod.TIME_SINCE_BOOT, self.sim_ms() // 1000
        else:
            timebase = batchmod.TIME_UNIX
        if self.records.count and timebase != self.batch_timebase:
            self.seal()  # the clock got set: do not mix time bases in one batch
            if self.records.count:
                return 0
        if self._records_full():
            self.seal()
            if self._records_full():
                return 0
        n = 0
        for sensor in self.sensors:
            try:
                values = sensor.read()
            except MemoryError:
                raise
            except Exception as e:  # a driver's fault: reported, never fatal
                self.sensor_faults += 1
                self.last_error = text(_TEXTS, _M_SENSOR, (getattr(sensor, "name", "?"), e))
                continue
            for name, unit, value in values:
                if value - value != 0:  # NaN or infinity: a fault the fleet would refuse
                    self.sensor_faults += 1
                    continue
                if not self.records.count:
                    self.batch_started_ms = self.sim_ms()
                    self.batch_timebase = timebase
                    rec = {_BT: t, _N: name, _U: unit, _V: value}
                    self._bt = t
                else:
                    rec = {_N: name, _U: unit, _V: value}
                    if t != self._bt:
                        rec[_T] = t - self._bt
                self.records.add(rec)
                n += 1
                if self.records.count >= self.cfg["batch_readings"]:
                    self.seal()
        self.readings_total += n
        self.last_sweep_ms = self.sim_ms()
        if self.records.count and self.sim_ms() - self.batch_started_ms >= \
                self.cfg["batch_seconds"] * 1000:
            self.seal()
        return n

    def _records_full(self):
        """True when the records buffer has no room left for another sweep (the bytes of
        records one sweep of every sensor takes, about)."""
        return self.records.size + len(self.sensors) * _SWEEP_READINGS * _RECORD_BYTES > \
            len(self.records.data)

    def seal(self):
        """Sign the collected records as one batch and store it (durable on return).

        A heap with no room for the signature's integers (MemoryError) keeps the records
        collected: counted in ``mem_errors``, tried again at the next reading (the heap
        changes as the other tasks go on), nothing lost. Any other failure drops them."""
        if not self.records.count:
            return
        # A collection first: the signature's few hundred temporary integers then fill the
        # lowest holes and go, instead of scattering what outlives them (the new chain head,
        # the state) over the free space; a heap that fragments fails with kilobytes free.
        gc.collect()
        try:
            data = self.writer.sign_chunks(self.records, self.boot, self.batch_timebase)
        except MemoryError:
            self.mem_errors += 1
            return
        except Exception:
            self.records.clear()
            raise
        try:
            self._store_signed(data, self.records.count + 1)
        finally:
            self.records.clear()  # signed: whether stored or not, these records are done
        self.batches_signed += 1

    def _store_signed(self, data, meta=0, reported=False):
        """Append one signed batch (its chunks), then persist the chain head. ``meta``
        goes into its header: a reading batch's readings + 1 (what a drop of it costs,
        known without decoding it), 0 for a drop record. ``reported``: this batch is the
        drop record for the tally in ``State`` key ``reporting`` (``report_drops``),
        cleared in the same write as the chain head."""
        try:
            self.store.append(self.writer.seq, data, meta)
        except StorageError as e:
            self.store_ok = False
            self.last_error = str(e)
            raise
        if reported:
            self.state.set(seq=self.writer.seq, head=self.writer.head, reporting=None)
        else:
            self.state.set(seq=self.writer.seq, head=self.writer.head)
        self.store_ok = True

    def _on_drop(self, seqs):
        """The ring buffer is about to delete ``seqs`` (budget or CRC): add what they cost
        to the tally on flash (``State`` key ``drop``) first. ``drops`` is loaded for
        this only."""
        from . import drops

        pending = drops.merge(self.state.get("drop"), drops.cost(self.store, seqs))
        drops = None
        unload("cityedge_fw.drops", *ON_DEMAND)  # and the decoder, if a drop record needed it
        self.state.set(drop=pending)
        keep = self.store.keep
        for seq in seqs:
            if seq in keep:  # dropped after all (nothing else was left)
                keep.remove(seq)

    def _fold_reporting(self):
        """A drop record whose append did not finish (a power cut, a flash error): its
        tally (``reporting``) goes back into the pending one, to be reported again."""
        reporting = self.state.get("reporting")
        if reporting is None:
            return
        from . import drops

        pending = drops.merge(reporting, self.state.get("drop"))
        drops = None
        unload("cityedge_fw.drops")
        self.state.set(drop=pending, reporting=None)

    def report_drops(self):
        """Sign and store one drop record for everything dropped so far (if anything).

        Called when the link is up, right before forwarding: while the link is down the
        tally just grows, so a week-long outage costs one drop record, not one per batch.
        ``dropped = [first_seq, last_seq, batches, readings]`` counts every lost batch
        (earlier drop records included) and every lost reading.

        The tally moves from ``drop`` to ``reporting`` (one write) before the append, so
        what the append itself pushes out starts a new tally, and a power cut before the
        record is stored reports the old one again (``_fold_reporting`` at boot)."""
        tally = self.state.get("drop")
        if tally is None:
            return False
        gc.collect()
        data = self.writer.sign_chunks(batchmod.RecordBuffer(), self.boot,
                                       batchmod.TIME_SINCE_BOOT, batchmod.KIND_DROP, list(tally))
        self.state.set(reporting=tally, drop=None)
        try:
            self._store_signed(data, 0, True)
        except StorageError:
            self._fold_reporting()
            raise
        self.drops_total += tally[2]
        return True

    # --- MQTT ----------------------------------------------------------------------------
    async def _on_connect(self):
        await self.link.subscribe([(self.topics[_T_CMD], 1), (self.topics[_T_DESIRED], 1)])

    async def _on_event(self, event):
        kind = event[0]
        if kind == mqtt.PUBACK:
            seq = self._pid_seq.pop(event[1], None)
            if seq is not None:
                if seq in self.store.keep:
                    self.store.keep.remove(seq)
                try:
                    self.store.remove(seq)
                    self.published += 1
                except StorageError as e:
                    self.store_ok = False
                    self.last_error = str(e)
        elif kind == mqtt.PUBLISH:
            await self.handle_command(event[2])
        elif kind == mqtt.SUBACK and 0x80 in event[2]:
            self.last_error = text(_TEXTS, _M_SUBSCRIBE)

    async def handle_command(self, payload, tries=0):
        """Check a fleet command (``command_gate.CommandGate``) and carry it out. The gate and
        the decoders it needs are loaded for the check and unloaded after it.

        Loading them needs about 4 KB in a heap that streaming has cut into small pieces;
        if it finds no room (MemoryError) the command is counted in ``mem_errors`` and
        checked again later by the forwarder (another moment, another heap layout), up to
        ``_COMMAND_TRIES`` times in all: the broker acknowledged it, it is not sent twice.
        The forwarder's read buffer is let go first (one free block a batch in size, where
        the decoders' pieces fit); the forwarder makes a new one when it next reads.

        Every authentic command for this device but ``desired`` is answered with a signed
        result (``answers``, loaded for it), which also runs the key rotation's commands
        (``rotation_device``)."""
        self._fwd = None
        from cityedge_core import command_gate as commands

        name = seq = args = None
        try:
            name, seq, args = commands.CommandGate(self.device, self.fleet_keys, self.state,
                                                   self.board.unix_time).check(payload)
        except (PeerError, StorageError) as e:
            self.last_error = text(_TEXTS, _M_REFUSED, (e,))
            if getattr(e, "seq", None) is None or e.name == "desired":
                return None  # forged, another device's, the retained state: not answered
            name = e  # authentic, for this device: answered (refused, or the kept answer)
        except MemoryError:
            self.mem_errors += 1
            self._defer(payload, tries + 1)
            return None
        finally:
            commands = None
            unload(*ON_DEMAND)
        if isinstance(name, str):
            self.commands_accepted += 1
            if name == "desired":
                if isinstance(args, dict):
                    self.apply_desired(args)
                return name
            if name == "status" and not await self.publish_status():
                self._defer(None, 1)  # asked for: sent once the heap has room
        if name == "update" and self.cfg.get("update"):
            # kept, and carried out from the next boot's start (``update_agent``): its
            # module loaded now would need room that streaming has taken. Not answered
            # now: its outcome (committed, rolled back) is the answer the fleet waits for
            self.state.set(update_cmd=[args, self.board.unix_time(), seq])
            self.seal()  # the records collected so far: no reading is lost to the reset
            self.board.reset()
            return name
        if not isinstance(name, str) and name.name == "update":
            kept = self.state.get("update_cmd")
            if kept and len(kept) > 2 and kept[2] == name.seq:
                return None  # the fleet sent it again while it is carried out
        # the signed result (``answers``, loaded for it; the rotation's commands run there)
        from . import answers

        try:
            await answers.send(self, name, seq, args)
        except MemoryError:  # not answered: the fleet sends the command again
            self.mem_errors += 1
        finally:
            answers = None
            unload("cityedge_fw.answers")
        return name if isinstance(name, str) else None

    def _defer(self, payload, tries):
        """Try a command (``payload``) or a status the fleet asked for (None) again from
        the forwarder, ``_RETRY_MS * tries`` from now, or give up after
        ``_COMMAND_TRIES``."""
        if tries < _COMMAND_TRIES and len(self._deferred) < _DEFERRED_MAX:
            self._deferred.append((payload, tries, self.link.clock() + _RETRY_MS * tries))
        elif payload is None:
            self.last_error = "status dropped: no heap to sign it"
        else:
            self.last_error = "command dropped: no heap to check it"

    def apply_desired(self, args, persist=True):
        """Take the known, in-range keys of a desired-state map; ignore the rest."""
        kept = {}
        for key, lo, hi in DESIRED:
            v = args.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
                self.cfg[key] = v
                kept[key] = v
        if persist:
            self.state.set(desired=kept)

    async def forward_once(self):
        """Hand the next stored batches to MQTT while the window has room. True if
        batches still wait (the window is full), False if all are handed over."""
        client = self.link.client
        if self._deferred and self.link.clock() >= self._deferred[0][2]:
            payload, tries, _ = self._deferred.pop(0)
            gc.collect()
            if payload is None:  # a status a command asked for, which found no heap
                if not await self.publish_status():
                    self._defer(None, tries + 1)
            else:
                await self.handle_command(payload, tries)
            payload = None
        if client.can_publish():
            self.report_drops()
        sent = self._sent
        while True:
            if client.sessions != sent[0]:
                # a new connection (also during the await below): the client forgot what
                # the old one left unacknowledged, so forward again from the oldest batch
                sent[0] = client.sessions
                self._pid_seq = {}
                sent[1] = 0
            if not client.can_publish():
                return client.state == mqtt.CONNECTED and self.store.count > len(self._pid_seq)
            if self._fwd is None:  # given up for a command: made again (or the batch is read
                try:  # into fresh bytes, as a batch too large for it is)
                    self._fwd = bytearray(self._fwd_bytes())
                except MemoryError:
                    pass
            # one batch in RAM (in ``_fwd``), not the window
            batch = self.store.next_after(sent[1], self._fwd)
            if batch is None:
                return False
            # record the packet id before any await: a failed flush must not lose it
            pid = client.publish(self.topics[_T_READINGS], batch[1], 1, False,
                                 self.link.clock())
            self._pid_seq[pid] = batch[0]
            sent[1] = batch[0]
            if batch[0] not in self.store.keep:  # the fleet may have it from now on
                self.store.keep.append(batch[0])
            batch = None
            await self.link.flush()
            while self.link.sending():  # another task drains the queue: ``_fwd`` is in it
                await sleep_ms(_FORWARD_BUSY_MS)

    def status_cbor(self):
        """The status map, CBOR-encoded (deterministic, as ``cbor.dumps`` of the same map
        writes it) straight into one buffer: the keys in their encoded order
        (``_STATUS_KEYS``), the values in the same order. No dict and no sorted list of
        encoded pairs (``cbor.dumps``' way, about 2 KiB of pieces) in the heap a status
        shares with streaming: a status that found no room was skipped."""
        gc.collect()
        values = (  # in the order of ``_STATUS_KEYS``
            VERSION,
            self.writer.seq,
            self.boot,
            getattr(self.board, "name", "?"),
            self.drops_total,
            self.device,
            self.state.get("update"),  # [state, version, sequence, reason]
            self.readings_total,
            self.sim_ms() // 1000,
            self.board.free_heap(),
            self.last_error or self.link.last_error or "",
            self.mem_errors,
            self.store.used_bytes,
            self.store.budget,
            self.link.connects,
            self.sensor_faults,
            self.store.count,
        )
        out = bytearray()
        cbor.encode_head(out, 5, _STATUS_PAIRS)
        pos = 0
        for value in values:
            end = pos + _STATUS_KEYS[pos] - 0x5F  # the key's head byte and its text
            out.extend(_STATUS_KEYS[pos:end])
            pos = end
            cbor.encode_into(out, value)
        return out

    async def publish_status(self):
        """Sign and send the status map (QoS 0), as chunks that are never joined. A heap
        with no room for it skips this one (counted in ``mem_errors``): the next status
        reports the count, and the readings never wait for a status."""
        if self.link.client.state != mqtt.CONNECTED:
            return False
        try:
            data = cose.sign1_chunks((self.status_cbor(),), self.writer.signer,
                                     self.writer.kid)
        except MemoryError:
            self.mem_errors += 1
            self.last_error = "status skipped: no heap to sign it"
            return False
        await self.link.publish(self.topics[_T_STATUS], data, 0)
        return True

    # --- tasks -------------------------------------------------------------------------
    async def forwarder(self):
        """Forward whenever the link is up, polling: every ``_FORWARD_POLL_MS`` while
        there is nothing to send (a sealed batch waits at most that long), every
        ``_FORWARD_BUSY_MS`` while batches wait for room in the in-flight window (for a
        PUBACK). A poll costs no heap; an ``asyncio.Event`` would keep its module (1.2 KB)
        on the heap. The status goes out from here too, every ``status_interval_s`` (the
        task that sends batches sends it: no task and coroutine frame of its own)."""
        due = self.sim_ms()  # the next status, on the schedule clock
        while True:
            waiting = False
            if self.link.client.state == mqtt.CONNECTED:
                try:
                    waiting = await self.forward_once()
                except (OSError, CityedgeError) as e:
                    self.last_error = text(_TEXTS, _M_FORWARDER, (e,))
                except MemoryError:  # a batch read or a send found no room: the batch
                    self.mem_errors += 1  # is on flash, sent on a later round
            if self.sim_ms() - due >= self.cfg["status_interval_s"] * 1000:
                due = self.sim_ms()
                try:
                    await self.publish_status()
                except (OSError, CityedgeError) as e:
                    self.last_error = "status: %s" % e
            await sleep_ms(_FORWARD_BUSY_MS if waiting else _FORWARD_POLL_MS)

    def healthy(self):
        late = self.sim_ms() - self.last_sweep_ms
        return self.store_ok and late < _UNHEALTHY_AFTER_SWEEPS * \
            self.cfg["sample_interval_s"] * 1000

    async def run(self):
        """Run the agent until one of its tasks ends (then the watchdog resets the board).

        This task samples (a sweep every ``sample_interval_s``, ``sweep``) and runs the
        watchdog: it feeds the board's watchdog while healthy and ends as soon as another
        task (the link, the forwarder) has ended, re-raising its error, if it still has
        it. The sampler and the watchdog share this task, and the status the forwarder's
        (``forwarder``): each task and its coroutine frame is ~0.3 KB of heap while
        streaming; ``asyncio.gather`` would keep one more asyncio module on the heap."""
        tasks = [asyncio.create_task(self.link.run()), asyncio.create_task(self.forwarder())]
        if self.cfg.get("update"):  # an update in progress (or on trial) goes on
            from os import stat

            try:
                if not self.state.get("update_cmd"):
                    stat(self.cfg["update"]["dir"].rstrip("/") + "/update.json")
                from . import update_agent  # loaded only then (its module doc)

                update_agent.run(self)
            except OSError:
                pass
            except MemoryError:  # streaming goes on; the update waits for a boot with room
                self.mem_errors += 1
                self.last_error = "update: no heap to load it"
        try:
            due = self.sim_ms()  # the next sweep, on the schedule clock
            while True:
                for t in tasks:
                    if t.done():
                        await t
                        return
                start = self.sim_ms()
                if start >= due:
                    try:
                        self.sweep()
                    except (StorageError, CityedgeError, ValueError) as e:
                        self.last_error = text(_TEXTS, _M_SAMPLER, (e,))
                    due = start + self.cfg["sample_interval_s"] * 1000
                if self.healthy():
                    self.board.wdt_feed()
                await self.sleep_sim(min(due - self.sim_ms(), self.cfg["watchdog_ms"] *
                                         self.cfg["time_scale"]))
        finally:
            for t in tasks:
                t.cancel()
