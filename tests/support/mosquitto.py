"""A real Mosquitto for tests: a throwaway PKI and a TLS broker on a free loopback port.

``TestPKI`` makes a city CA (P-256), a server certificate for 127.0.0.1/localhost, and
device or service client certificates whose CN is the MQTT username and client id.
``Mosquitto`` writes the production configuration (``cityedge_fleet.broker``: TLS
listener, ``require_certificate``, CN as username and client id, a CRL, the dynamic
security plugin with ``broker_acl``'s rules), starts ``/usr/sbin/mosquitto`` and waits
until the port accepts connections. It can be stopped, killed and restarted on the same
port (for outage tests).

Mosquitto drops root privileges to its own user, so every file it reads lives in a
directory made world-readable for it; the keys in it are throwaway test keys.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cityedge_fleet import broker, broker_acl
from cityedge_fleet.broker_control import BrokerControl
from cityedge_fleet.broker_sync import BrokerAccess
from cityedge_host.ports import free_port as free_port  # its home; the tests import it here

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT_S = 10.0

SHARE_GROUP = "cityedge-ingest"  # the fleet's development default (Settings)
# a test-only identity that may watch every topic (tests check what devices sent); no
# production identity may (broker_acl)
OBSERVER = "test-observer"
FIXTURE_CONTROL = "fleet-control-fixture"  # the fixture's own grants (the fleet's may run too)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Credentials:
    """Paths (PEM and DER) of one client or server certificate and its key."""

    def __init__(self, directory: Path, name: str, key: ec.EllipticCurvePrivateKey,
                 cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        safe = name.replace(":", "_")
        self.cert_pem = directory / (safe + ".crt")
        self.key_pem = directory / (safe + ".key")
        self.cert_der = directory / (safe + ".crt.der")
        self.key_der = directory / (safe + ".key.der")
        self.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.cert_der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        self.key_pem.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        # SEC1 "EC PRIVATE KEY" DER: what MicroPython's mbedTLS loads most reliably
        self.key_der.write_bytes(key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        for p in (self.cert_pem, self.key_pem, self.cert_der, self.key_der):
            p.chmod(0o644)


class TestPKI:
    """A throwaway city CA that issues server and client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, ca_name: str = "cityedge test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(ca_name))
            .issuer_name(_name(ca_name))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_pem = self.dir / "ca.crt"
        self.ca_der = self.dir / "ca.crt.der"
        self.ca_pem.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        self.ca_der.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.DER))
        self.revoked: list[int] = []
        self._services: dict[str, Credentials] = {}
        self.server = self._issue("server", server=True)

    def issue_server(self, name: str, addresses: list[str]) -> Credentials:
        """Another server certificate, for these IP addresses as well as 127.0.0.1 and
        localhost (brokers on hosts of their own: ``support.netns``)."""
        return self._issue(name, server=True, addresses=addresses)

    def _issue(self, cn: str, server: bool = False,
               key: ec.EllipticCurvePrivateKey | None = None,
               addresses: list[str] | None = None) -> Credentials:
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(a))
                                             for a in ["127.0.0.1", *(addresses or [])])]),
                critical=False).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            if cn.startswith("urn:"):
                builder = builder.add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(cn)]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return Credentials(self.dir, cn, key, cert)

    def issue_client(self, cn: str, key: ec.EllipticCurvePrivateKey | None = None
                     ) -> Credentials:
        """A client certificate with CN = ``cn`` (a device URN or a service name)."""
        return self._issue(cn, key=key)

    def revoke(self, creds: Credentials) -> None:
        self.revoked.append(creds.cert.serial_number)

    def service(self, cn: str) -> Credentials:
        """The one certificate of service ``cn`` this PKI issued (issued on first use)."""
        if cn not in self._services:
            self._services[cn] = self.issue_client(cn)
        return self._services[cn]

    def write_crl(self, path: Path, revoked: Iterable[int] | None = None) -> Path:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=1))
            .next_update(now + dt.timedelta(days=1))
        )
        for serial in self.revoked if revoked is None else revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1)).build())
        crl = builder.sign(self.ca_key, hashes.SHA256())
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        path.chmod(0o644)
        return path


class Mosquitto:
    """A Mosquitto process with a TLS listener on a free port, for one test (or module).

    Configured as production is (``cityedge_fleet.broker``): CN as username and client id,
    every authorization by the dynamic security plugin with the rules of
    ``cityedge_fleet.broker_acl``. The fleet's services (``fleet-ingest``,
    ``fleet-commands``, ``fleet-control``) are let in from the start; a device only once
    granted: ``grant(cn)`` before ``start`` writes it into the plugin's first state, after
    it goes through the plugin's control topic as the fleet does (``broker_sync``).
    ``grant_custom(cn, acls)`` gives a test-only identity (a site broker's gateway, a load
    generator) rules of its own; ``OBSERVER`` (``pki.service(OBSERVER)``) may watch every
    ``ce/v1/`` topic, for tests that check what devices sent.
    """

    def __init__(self, pki: TestPKI, directory: Path | None = None,
                 persistence: bool = False, crl: bool = False, extra: str = "",
                 clients: Iterable[str] = (), share_group: str = SHARE_GROUP,
                 crl_file: Path | None = None) -> None:
        self.pki = pki
        self.dir = Path(directory or tempfile.mkdtemp(prefix="cityedge-mosq-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o777)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "mosquitto.log"
        self.share_group = share_group
        self.identities: set[str] = {*broker_acl.DEFAULT_SERVICES, *clients}
        self.custom: dict[str, list[broker_acl.Acl]] = {OBSERVER: [
            broker_acl.Acl("subscribePattern", "ce/v1/#"),
            broker_acl.Acl("publishClientReceive", "ce/v1/#")]}
        self.identities.add(FIXTURE_CONTROL)
        self.control_creds = pki.service(FIXTURE_CONTROL)
        self._access: BrokerAccess | None = None
        self.dynsec_file = self.dir / broker.DYNSEC_FILE
        # crl_file: the fleet's own CRL (a test of revocation through the fleet); else one
        # of this PKI, listing nothing without crl=True (production always has one)
        self.crl_path = crl_file or self.dir / "crl.pem"
        if crl_file is None:
            pki.write_crl(self.crl_path, revoked=None if crl else ())
        self.pid_file = self.dir / "mosquitto.pid"  # for the fleet's SIGHUP after a new CRL
        # persistence: the production lines (cityedge_fleet.broker), state in self.dir
        lines = [] if persistence else ["persistence false"]
        lines += [
            "log_dest file %s" % self.log,
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",
            "max_inflight_messages 100",
        ]
        if extra:
            lines.append(extra)
        files = broker.BrokerFiles(cafile=pki.ca_pem, certfile=pki.server.cert_pem,
                                   keyfile=pki.server.key_pem, crlfile=self.crl_path)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(broker.render(files, port=self.port, bind="127.0.0.1",
                                           plugin=broker.find_dynsec_plugin(),
                                           dynsec_file=self.dynsec_file, extra=lines,
                                           persistence_dir=self.dir if persistence else None))
        self.conf.chmod(0o644)
        # pki files must be reachable by the mosquitto user
        for d in (pki.dir, pki.dir.parent):
            with contextlib.suppress(PermissionError):
                d.chmod(d.stat().st_mode | 0o755)

    def _write_dynsec(self) -> None:
        state = broker.dynsec_config(self.identities, self.share_group)
        for cn, acls in self.custom.items():
            state["clients"].append({"username": cn, "roles": [
                {"rolename": broker_acl.role_name(cn), "priority": 0}]})
            state["roles"].append({"rolename": broker_acl.role_name(cn),
                                   "acls": [a.to_json() for a in acls]})
        self.dynsec_file.write_text(json.dumps(state))
        self.dynsec_file.chmod(0o666)

    @property
    def access(self) -> BrokerAccess:
        """The fleet's own grant/cut client for this broker (as ``fleet-control``)."""
        if self._access is None:
            c = self.control_creds
            self._access = BrokerAccess(BrokerControl(
                "127.0.0.1", self.port, ca_file=self.pki.ca_pem, cert_file=c.cert_pem,
                key_file=c.key_pem, timeout_s=10.0), self.share_group)
        return self._access

    def _running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def grant(self, *cns: str) -> Mosquitto:
        """Let ``cns`` in with their production rules."""
        for cn in cns:
            self.identities.add(cn)
            if self._running():
                self.access.grant(cn)
        return self

    def cut(self, cn: str) -> None:
        """Take ``cn``'s grant away (its live session is closed)."""
        self.identities.discard(cn)
        if self._running():
            self.access.cut(cn)

    def grant_custom(self, cn: str, acls: list[broker_acl.Acl]) -> Mosquitto:
        """A test-only identity with ``acls`` (not one production knows); before ``start``."""
        assert not self._running(), "grant_custom before start"
        self.custom[cn] = acls
        return self

    def start(self) -> Mosquitto:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not self.dynsec_file.exists():  # a restart keeps what the plugin saved
            self._write_dynsec()
        if self.log.exists():
            self.log.chmod(0o666)
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.pid_file.write_text("%d\n" % self.proc.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError("mosquitto exited at start: %s %s" % (err, self.read_log()))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not listen on port %d in %.0f s: %s"
                           % (self.port, START_TIMEOUT_S, self.read_log()))

    def stop(self) -> None:
        if self._access is not None:
            self._access.close()
            self._access = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """Kill -9: the broker vanishes without a goodbye."""
        if self._access is not None:
            self._access.close()
            self._access = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its config, ACL and CRL."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGHUP)
            time.sleep(0.3)

    def read_log(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
