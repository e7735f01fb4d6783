"""Provisioning on the device, the step state machine: one request in, its reply out.

Provisioning mode is three modules with one job each: this one (``Provisioner``: the steps,
their order, the files they write; no I/O but the device's flash), ``provision_serial``
(the frame loop on the UART) and ``provision_selftest`` (the ``self_test`` step's network
check, over the agent's own MQTT link); ``provision_main`` wires them (the line, and the
self-test this machine is given) and is the entry on a board and on the unix port. This
module imports neither MQTT, nor asyncio, nor the serial side
(``tests/docs/test_layers_provision.py``).

The device is reachable here only while it is unprovisioned, or after an authenticated
unlock (a COSE_Sign1 fleet command named ``unlock`` for this device, checked by
``command_gate.CommandGate``); a locked device answers ``hello`` and ``unlock`` and refuses
everything else with ``E_LOCKED``. There is no REPL behind it.

Steps (message types and fields in ``cityedge_core.frame``) and the state each needs:

============  ===========================  ==============================================
step          allowed in state             effect
============  ===========================  ==============================================
hello         any                          model, hardware serial, firmware, state, URN;
                                           while not locked, the claim secret (below)
generate_key  unprovisioned..tested        new P-256 key from ``os.urandom`` (the board's
                                           RNG); any installed identity is removed first;
                                           state ``keyed``. The private key is written to
                                           flash and never leaves the device.
csr           keyed..tested                PKCS#10 DER for the key (``cityedge_core.csr``)
install       keyed..tested, pending       certificate chain (its leaf must hold our public
                                           key), CA, broker, fleet keys, config; each file
                                           written atomically, the state file last:
                                           ``installed``. With ``F_STATEMENT`` (the
                                           fleet's trust statement, below) the reply
                                           also says whether it was installed
install with  keyed, pending               offline provisioning: an *enrollment ticket*
  a ticket                                 (``F_TICKET``, below) instead of a chain; stored
                                           atomically, state ``pending-enrollment``
self_test     installed, tested            the network check it is given
                                           (``provision_selftest``): TCP to the broker,
                                           TLS with the new certificate, MQTT CONNECT,
                                           its command topic subscribed, one signed batch
                                           published QoS 1 and acknowledged: ``tested``
lock          tested                       ``locked``: the agent boots from now on
unlock        locked                       back to ``tested`` (files are kept)
============  ===========================  ==============================================

Offline provisioning (the laptop has no connection): the install request carries
``F_TICKET`` = ``{"token", "url", "ca", "dev_http", "register", "fleet_keys",
"server_hostname"}``: the one-time enrollment token fetched beforehand, the fleet's
``/enroll/ticket`` URL, the DER CA of the fleet's HTTPS certificate, what to register.
The device adds its serial and its CSR (PEM) and stores the ticket. From then on its boot
path (``provision_main``) retries the enrollment itself between UART reads
(``enroll_http.Enroller``, jittered backoff); the fleet's answer is installed exactly as
the ``install`` step does, then the device locks itself and starts the agent. A refusal
that retrying cannot fix (token expired, unknown or for another serial) drops the ticket
and returns to ``keyed``: the technician's next visit finishes the device. The
technician may also come back first: a normal ``install`` replaces the ticket.

Claim secret: the vendor writes a one-time secret (at least 128 random bits, text) to
``claim.txt`` in the device's flash at the factory and gives the fleet only its SHA-256
(the delivery manifest). ``hello`` reports it while the device is not locked, so the
technician's tool can prove to the fleet that the device in hand is the allow-listed one
(a serial alone is public). Nothing here writes or removes it; the fleet accepts it once.

Trust statement: the fleet's enrollment answer carries the offline root's newest signed
statement of the fleet's command keys (``EnrollResponse.trust_statement``,
``cityedge_core.trust_statement``). The device's own enrollment (a ticket) installs it
from the answer; the technician's tool passes it on in the ``install`` request
(``F_STATEMENT``, the bytes the root signed). Both go through ``_install_statement``:
``trust_check.install_checked`` against the root of the CA just installed (the last
certificate: the offline root), at the device's own clock, or, for a device without one
(a board before NTP), at the host's time the request carries (``F_NOW``: the host may
write the seed ``fleet_keys`` itself, so its clock gives it nothing more; the window only
bounds which root-signed statement may be installed). Installed: the device holds that
version and its keys from the agent's first boot (``keys.load_fleet_keys``), and an older
statement replayed later is refused as a rollback. Refused (not the root's, garbage,
outside its window, not newer): nothing is written, the seed ``fleet_keys`` stay the
device's trust, the install itself stands, and the reply says ``refused`` with the
reason. The checker is unloaded afterwards (the self-test needs the room).

A request out of order gets ``E_ORDER``; bad fields ``E_BAD_INPUT``; a flash failure
``E_STORAGE``. Every reply echoes the request's ``F_ID``. Nothing here blocks except the
self-test, which is bounded by its timeout.

Memory (unix port, MicroPython 1.27, ``gc.mem_alloc()`` after a collection; the self-test
prints its figures on stderr). From ROMFS (bytecode in flash, as on a board), provisioning
mode holds 50 KB on entry (with the 3 KB block ``provision_main.SelfTestHook`` keeps for
the TLS context) and 65 KB after the key, CSR and install steps; the self-test loads the
MQTT client, the link and asyncio (81 KB in use before TLS) and peaks at 83.7 KB with its
TLS link up. A whole provisioning passes at ``-X heapsize=90k`` and above
(``tests/firmware/test_boot.py`` runs it at 96k). As .mpy loaded into the heap
(``tests/provisioning``, 192k) the peak is 107 KB. An install with a trust statement
keeps 1.9 KB more (the checker's names stay interned when its modules are unloaded) and
cuts the heap up more (``tests/firmware/test_boot.py`` runs that case at 104k). The CSR
code is loaded only by the steps that use it, so the self-test can drop it before TLS.
Key generation and the CSR signature take a few milliseconds each on the unix port
(pure-Python P-256).
"""

import gc
import os
import time

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from cityedge_core import cbor, cose, frame, p256
from cityedge_core.errors import CityedgeError, PeerError, StorageError

from .files import write_atomic

PROTOCOL_VERSION = const(1)
SELF_TEST_MAX_S = const(60)  # seconds: longest self-test a host may ask for
SELF_TEST_DEFAULT_S = const(20)  # seconds: when the host does not say

UNPROVISIONED = "unprovisioned"
KEYED = "keyed"
INSTALLED = "installed"
TESTED = "tested"
LOCKED = "locked"
PENDING = "pending-enrollment"  # holds an offline enrollment ticket (see above)

F_TICKET = frame.F_TICKET  # install field carrying the offline enrollment ticket
TICKET_MAX_BYTES = const(6144)  # bytes of a stored ticket (token, URL, CA, CSR, register)

# file names under the device's root directory
STATE_FILE = "provision.cbor"
TICKET_FILE = "ticket.cbor"
KEY_FILE = "key.der"
CERT_FILE = "cert.der"
CA_FILE = "ca.der"
CONFIG_FILE = "config.json"
AGENT_STATE_FILE = "state.cbor"
FLEET_KEY_FILE = "fleet_key_%d.sec1"
CLAIM_FILE = "claim.txt"  # the vendor's claim secret (factory data, never rewritten here)
INSTALLED_FILES = (CONFIG_FILE, CERT_FILE, CA_FILE)

_T = frame


class StepRefused(PeerError):
    """A well-formed request the device will not do now (carries a frame error code)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _write_atomic(path, data):
    """``files.write_atomic``, its failure said as the device's storage error."""
    try:
        write_atomic(path, data)
    except OSError as e:
        raise StorageError("cannot write %s: %s" % (path, e)) from e


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


class Provisioner:
    """The device's provisioning state machine; ``handle(msg)`` returns the reply map.

    ``info``: ``{"model", "serial", "device", "firmware"}`` from the board.
    ``root``: directory of the device's files (``/`` on a board).
    ``self_test``: ``self_test(prov, timeout_s)`` -> ``(ok, stage, message, seq)``, the
    network check behind the ``self_test`` step (``provision_selftest.run``, given by
    the entry that wires the device, ``provision_main``): this module stays free of
    MQTT, TLS and asyncio. Without one the step answers ``E_INTERNAL``.
    """

    def __init__(self, root, info, randbytes=os.urandom, clock=None, self_test=None):
        self.root = root.rstrip("/")
        self.info = info
        self.randbytes = randbytes
        self.clock = clock or _unix_clock
        self.run_self_test = self_test
        self._key = None
        raw = _read(self._path(STATE_FILE))
        self.state = UNPROVISIONED
        if raw is not None:
            try:
                self.state = cbor.loads(raw)["state"]
            except (CityedgeError, KeyError, TypeError):
                self.state = UNPROVISIONED  # a torn state file: start over
        if self.state != UNPROVISIONED and _read(self._path(KEY_FILE)) is None:
            self.state = UNPROVISIONED

    def _path(self, name):
        return self.root + "/" + name

    def _set_state(self, state):
        _write_atomic(self._path(STATE_FILE), cbor.dumps({"state": state}))
        self.state = state

    def key(self):
        """The device's private key (loaded from flash on first use)."""
        if self._key is None:
            from .keys import private_key_from_der  # boot-only module, loaded when used

            der = _read(self._path(KEY_FILE))
            if der is None:
                raise StepRefused(_T.E_ORDER, "no device key yet: generate_key first")
            self._key = private_key_from_der(der)
        return self._key

    # --- dispatch ----------------------------------------------------------------------
    def handle(self, msg):
        rid = msg.get(_T.F_ID)
        try:
            reply = self._dispatch(msg)
        except StepRefused as e:
            reply = _T.error_message(e.code, str(e))
        except (PeerError, ValueError, TypeError, KeyError) as e:
            reply = _T.error_message(_T.E_BAD_INPUT, "%s: %s" % (type(e).__name__, e))
        except (StorageError, OSError) as e:
            reply = _T.error_message(_T.E_STORAGE, str(e))
        except Exception as e:  # never die on a request; say what happened
            reply = _T.error_message(_T.E_INTERNAL, "%s: %s" % (type(e).__name__, e))
        if rid is not None:
            reply[_T.F_ID] = rid
        return reply

    def _dispatch(self, msg):
        t = msg[_T.F_TYPE]
        if t == _T.T_HELLO:
            return self.hello()
        if t == _T.T_UNLOCK:
            return self.unlock(msg)
        if t not in _T.TYPE_NAMES or t == _T.T_ERROR:
            raise StepRefused(_T.E_UNKNOWN_TYPE, "unknown message type %r" % (t,))
        if self.state == LOCKED:
            raise StepRefused(_T.E_LOCKED, "device is provisioned and locked; "
                                           "an authenticated unlock is needed")
        if t == _T.T_GENERATE_KEY:
            return self.generate_key()
        if t == _T.T_CSR:
            return self.make_csr()
        if t == _T.T_INSTALL and msg.get(F_TICKET) is not None:
            return self.store_ticket(msg[F_TICKET])
        if t == _T.T_INSTALL:
            return self.install(msg)
        if t == _T.T_SELF_TEST:
            return self.self_test(msg)
        return self.lock()

    def _need(self, *states):
        if self.state not in states:
            raise StepRefused(_T.E_ORDER, "not allowed in state %s (needs %s)"
                              % (self.state, " or ".join(states)))

    # --- steps -------------------------------------------------------------------------
    def hello(self):
        reply = {
            _T.F_TYPE: _T.T_HELLO, _T.F_MODEL: self.info["model"],
            _T.F_SERIAL: self.info["serial"], _T.F_FIRMWARE: self.info["firmware"],
            _T.F_STATE: self.state, _T.F_DEVICE: self.info["device"],
            _T.F_PROTOCOL: PROTOCOL_VERSION,
        }
        if self.state != UNPROVISIONED:
            reply[_T.F_KID] = cose.kid_for_public_key(self.key().public_key().to_sec1())
        if self.state != LOCKED:
            claim = _read(self._path(CLAIM_FILE))
            try:
                if claim:
                    reply[_T.F_CLAIM] = claim.decode().strip()
            except UnicodeError:
                pass  # a damaged claim: hello still answers, the fleet would refuse it
        return reply

    def generate_key(self):
        for name in INSTALLED_FILES + (TICKET_FILE,):  # nothing outlives its key
            _remove(self._path(name))
        from cityedge_core import csr  # loaded when used: the self-test unloads it

        key = p256.PrivateKey.generate(self.randbytes)
        _write_atomic(self._path(KEY_FILE), csr.ec_private_key_der(key))
        _remove(self._path(AGENT_STATE_FILE))  # a new key starts a new batch chain
        _remove(self._path(AGENT_STATE_FILE) + ".trust")  # and trusts the new seed only
        self._key = key
        self._set_state(KEYED)
        pub = key.public_key().to_sec1()
        return {_T.F_TYPE: _T.T_GENERATE_KEY, _T.F_PUBLIC_KEY: pub,
                _T.F_KID: cose.kid_for_public_key(pub)}

    def make_csr(self):
        self._need(KEYED, PENDING, INSTALLED, TESTED)
        from cityedge_core import csr

        return {_T.F_TYPE: _T.T_CSR, _T.F_CSR: csr.build_csr(self.key(), self.info["device"])}

    def install(self, msg):
        self._need(KEYED, PENDING, INSTALLED, TESTED)
        chain = msg.get(_T.F_CHAIN)
        cas = msg.get(_T.F_CA)
        broker = msg.get(_T.F_BROKER)
        config = msg.get(_T.F_CONFIG) or {}
        fleet_keys = msg.get(_T.F_FLEET_KEYS) or []
        if not isinstance(chain, list) or not chain or not all(
                isinstance(c, bytes) for c in chain):
            raise StepRefused(_T.E_BAD_INPUT, "install: chain must be a list of DER certificates")
        if not isinstance(cas, list) or not cas or not all(isinstance(c, bytes) for c in cas):
            raise StepRefused(_T.E_BAD_INPUT, "install: ca must be a list of DER certificates")
        if not isinstance(broker, dict) or not isinstance(broker.get("host"), str) \
                or not isinstance(broker.get("port"), int):
            raise StepRefused(_T.E_BAD_INPUT, "install: broker needs host and port")
        if not isinstance(config, dict) or not isinstance(fleet_keys, list):
            raise StepRefused(_T.E_BAD_INPUT, "install: config must be a map, fleet keys a list")
        pub = self.key().public_key().to_sec1()
        if chain[0].find(pub) < 0:
            raise StepRefused(_T.E_BAD_INPUT,
                              "install: the certificate is not for this device's key")
        key_paths = []
        for i, k in enumerate(fleet_keys):
            p256.PublicKey.from_sec1(k)  # refuses a point not on the curve
            path = self._path(FLEET_KEY_FILE % i)
            _write_atomic(path, k)
            key_paths.append(path)
        _write_atomic(self._path(CERT_FILE), chain[0])
        _write_atomic(self._path(CA_FILE), cas[-1])  # the root: what the device trusts
        import json

        cfg = {
            "device": self.info["device"],
            "broker": {"host": broker["host"], "port": broker["port"],
                       "server_hostname": broker.get("server_hostname") or broker["host"]},
            "tls": {"cert": self._path(CERT_FILE), "key": self._path(KEY_FILE),
                    "ca": self._path(CA_FILE)},
            "fleet_keys": key_paths,
            "store": {"dir": self._path("buffer"), "state": self._path(AGENT_STATE_FILE)},
            "fleet": config,
        }
        _write_atomic(self._path(CONFIG_FILE), json.dumps(cfg).encode())
        self._set_state(INSTALLED)
        _remove(self._path(TICKET_FILE))  # installed: a pending ticket has no use any more
        reply = {_T.F_TYPE: _T.T_INSTALL, _T.F_KID: cose.kid_for_public_key(pub)}
        statement = msg.get(_T.F_STATEMENT)
        if statement is not None:
            now = self.clock()
            if now is None and isinstance(msg.get(_T.F_NOW), int):
                now = msg[_T.F_NOW]  # no clock here: the host's (see the docstring)
            version, why = self._install_statement(statement, msg[_T.F_CA][-1], now)
            if version:
                reply[_T.F_TRUST] = "installed"
                reply[_T.F_TRUST_VERSION] = version
            else:
                reply[_T.F_TRUST] = "refused"
                reply[_T.F_MESSAGE] = why
        return reply

    # --- offline enrollment ticket ----------------------------------------------------------
    def store_ticket(self, ticket):
        """Keep the ticket (validated, with our serial and CSR added): ``pending``."""
        self._need(KEYED, PENDING)
        if not isinstance(ticket, dict):
            raise StepRefused(_T.E_BAD_INPUT, "ticket must be a map")
        token, url = ticket.get("token"), ticket.get("url")
        ca = ticket.get("ca")
        dev_http = ticket.get("dev_http") is True
        reg = ticket.get("register") or {}
        fleet_keys = ticket.get("fleet_keys") or []
        if not isinstance(token, str) or not token or not isinstance(url, str):
            raise StepRefused(_T.E_BAD_INPUT, "ticket: token and url are needed")
        from .enroll_http import parse_url

        try:
            tls = parse_url(url, dev_http)[0]
        except ValueError as e:
            raise StepRefused(_T.E_BAD_INPUT, "ticket: %s" % e) from e
        if tls and not isinstance(ca, bytes):
            raise StepRefused(_T.E_BAD_INPUT, "ticket: an https URL needs the fleet's CA (DER)")
        if not isinstance(reg, dict) or not isinstance(fleet_keys, list):
            raise StepRefused(_T.E_BAD_INPUT, "ticket: register must be a map, fleet keys a list")
        for k in fleet_keys:
            p256.PublicKey.from_sec1(k)  # refuses a point not on the curve
        from cityedge_core import csr

        stored = {"token": token, "url": url, "dev_http": dev_http,
                  "serial": self.info["serial"],
                  "csr_pem": csr.pem("CERTIFICATE REQUEST",
                                     csr.build_csr(self.key(), self.info["device"])),
                  "register": reg, "fleet_keys": fleet_keys,
                  "server_hostname": ticket.get("server_hostname")}
        if isinstance(ca, bytes):
            stored["ca"] = ca
        data = cbor.dumps(stored)
        if len(data) > TICKET_MAX_BYTES:
            raise StepRefused(_T.E_BAD_INPUT, "ticket: over %d bytes" % TICKET_MAX_BYTES)
        _write_atomic(self._path(TICKET_FILE), data)
        self._set_state(PENDING)
        return {_T.F_TYPE: _T.T_INSTALL, _T.F_STATE: PENDING,
                _T.F_KID: cose.kid_for_public_key(self.key().public_key().to_sec1())}

    def ticket(self):
        """The stored ticket while ``pending-enrollment``, else None."""
        if self.state != PENDING:
            return None
        raw = _read(self._path(TICKET_FILE))
        try:
            return cbor.loads(raw) if raw is not None else None
        except CityedgeError:
            return None  # torn: the technician's next visit finishes the device

    def finish_enrollment(self, ticket, answer):
        """Install the fleet's answer to the ticket exactly as ``install`` does, then lock.
        Returns what became of the answer's trust statement (for the log)."""
        from .enroll_http import pem_to_der_list

        broker_url = answer.get("broker_url") or ""
        hostport = broker_url.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        if not host:
            host, port = hostport, "8883"
        msg = {_T.F_CHAIN: pem_to_der_list(answer["chain_pem"]),
               _T.F_CA: pem_to_der_list(answer["ca_bundle_pem"]),
               _T.F_BROKER: {"host": host, "port": int(port),
                             "server_hostname": ticket.get("server_hostname") or host},
               _T.F_CONFIG: answer.get("config") or {},
               _T.F_FLEET_KEYS: ticket.get("fleet_keys") or []}
        self.install(msg)
        said = "no trust statement"
        statement = answer.get("trust_statement")
        if statement:  # the root's newest statement of the fleet's command keys (base64)
            from binascii import a2b_base64

            try:
                data = a2b_base64(statement)
            except ValueError as e:
                version, why = 0, "not base64: %s" % e
            else:
                version, why = self._install_statement(data, msg[_T.F_CA][-1],
                                                       self.clock())
            said = ("trust statement v%d installed" % version) if version else \
                "trust statement not installed: %s" % why
        self._set_state(LOCKED)  # the agent's connection is the proof from here on
        return said

    def _install_statement(self, data, root_der, now):
        """Install trust statement ``data`` as a ``trust-update`` would (``trust_check``:
        the root in ``root_der``, the window at ``now``, a version above the one held).
        Returns ``(version held, None)``, or ``(0, reason)`` when it is not installed (the
        seed fleet keys stay the device's trust). The checker leaves the heap after."""
        from cityedge_core.errors import PeerError

        from . import trust_check, unload

        path = self._path(AGENT_STATE_FILE) + ".trust"
        try:
            version = trust_check.install_checked(path, root_der, data, now)
            if not version:  # this very statement is installed already (a resumed install)
                version = trust_check.installed(path)[0]
            return version, None
        except (PeerError, ValueError, TypeError) as e:
            return 0, str(e) or type(e).__name__
        finally:
            trust_check = None
            unload("cityedge_fw.trust_check", "cityedge_core.trust_statement",
                   "cityedge_core.cose_decode")
            gc.collect()

    def drop_ticket(self):
        """The fleet refused the ticket for good: back to ``keyed``."""
        _remove(self._path(TICKET_FILE))
        self._set_state(KEYED)

    def self_test(self, msg):
        """Prove the installed identity with the broker (``run_self_test``): ``tested``
        when it passed; the reply names the stage that failed otherwise."""
        self._need(INSTALLED, TESTED)
        timeout_s = msg.get(_T.F_TIMEOUT, SELF_TEST_DEFAULT_S)
        if not isinstance(timeout_s, int) or not 0 < timeout_s <= SELF_TEST_MAX_S:
            raise StepRefused(_T.E_BAD_INPUT, "self_test: timeout 1..%d s" % SELF_TEST_MAX_S)
        if self.run_self_test is None:
            raise StepRefused(_T.E_INTERNAL, "self_test: this build has no self-test")
        ok, stage, text, seq = self.run_self_test(self, timeout_s)
        if ok:
            self._set_state(TESTED)
        return {_T.F_TYPE: _T.T_SELF_TEST, _T.F_OK: ok, _T.F_STAGE: stage,
                _T.F_MESSAGE: text, _T.F_SEQ: seq}

    def lock(self):
        self._need(TESTED)
        self._set_state(LOCKED)
        return {_T.F_TYPE: _T.T_LOCK, _T.F_STATE: LOCKED}

    def unlock(self, msg):
        if self.state != LOCKED:
            raise StepRefused(_T.E_ORDER, "unlock: device is not locked")
        from cityedge_core import command_gate

        from . import keys, store  # only for an unlock: not on the boot path

        cfg = self.config()
        gate = command_gate.CommandGate(self.info["device"],
                                        keys.load_fleet_keys(cfg.get("fleet_keys", ())),
                                        store.State(self._path(AGENT_STATE_FILE)), self.clock,
                                        require_clock=False)
        data = msg.get(_T.F_COMMAND)
        if not isinstance(data, bytes):
            raise StepRefused(_T.E_BAD_INPUT, "unlock: a signed fleet command is needed")
        name = gate.check(data)[0]  # PeerError -> E_BAD_INPUT with the reason
        if name != "unlock":
            raise StepRefused(_T.E_BAD_INPUT, "unlock: command is %r, not unlock" % name)
        self._set_state(TESTED)
        return {_T.F_TYPE: _T.T_UNLOCK, _T.F_STATE: TESTED}

    def config(self):
        """The installed ``config.json`` as a map (``E_ORDER`` before ``install``)."""
        import json

        raw = _read(self._path(CONFIG_FILE))
        if raw is None:
            raise StepRefused(_T.E_ORDER, "no configuration installed")
        return json.loads(raw)


def _unix_clock():
    now = int(time.time())
    return now if now > 1600000000 else None  # no trusted clock before NTP


def is_locked(root):
    """True once provisioning finished (the board boots the agent); False: serve the UART."""
    raw = _read(root.rstrip("/") + "/" + STATE_FILE)
    try:
        return raw is not None and cbor.loads(raw)["state"] == LOCKED
    except (CityedgeError, KeyError, TypeError):
        return False
