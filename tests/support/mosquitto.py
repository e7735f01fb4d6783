"""A real Mosquitto for tests: a throwaway PKI and a TLS broker on a free loopback port.

``TestPKI`` makes a city CA (P-256), a server certificate for 127.0.0.1/localhost, and
device or service client certificates whose CN is the MQTT username
(``use_identity_as_username``). ``Mosquitto`` writes a config with a TLS listener,
``require_certificate true``, an ACL file with ``%u`` patterns and optionally a CRL,
starts ``/usr/sbin/mosquitto`` and waits until the port accepts connections. It can be
stopped, killed and restarted on the same port (for outage tests).

Mosquitto drops root privileges to its own user, so every file it reads lives in a
directory made world-readable for it; the keys in it are throwaway test keys.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cityedge_fleet.broker import ACL

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT_S = 10.0

DEFAULT_ACL = ACL  # the production ACL that `cityedge broker config` writes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        self.server = self._issue("server", server=True)

    def _issue(self, cn: str, server: bool = False,
               key: ec.EllipticCurvePrivateKey | None = None) -> Credentials:
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
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
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

    def write_crl(self, path: Path) -> Path:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=1))
            .next_update(now + dt.timedelta(days=1))
        )
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1)).build())
        crl = builder.sign(self.ca_key, hashes.SHA256())
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        path.chmod(0o644)
        return path


class Mosquitto:
    """A Mosquitto process with a TLS listener on a free port, for one test (or module)."""

    def __init__(self, pki: TestPKI, directory: Path | None = None, acl: str = DEFAULT_ACL,
                 persistence: bool = False, crl: bool = False, extra: str = "") -> None:
        self.pki = pki
        self.dir = Path(directory or tempfile.mkdtemp(prefix="cityedge-mosq-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o777)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "mosquitto.log"
        acl_path = self.dir / "acl"
        acl_path.write_text(acl)
        acl_path.chmod(0o644)
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            "persistence %s" % ("true" if persistence else "false"),
            "persistence_location %s/" % self.dir,
            "log_dest file %s" % self.log,
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",
            "acl_file %s" % acl_path,
            "max_inflight_messages 100",
            "listener %d 127.0.0.1" % self.port,
            "cafile %s" % pki.ca_pem,
            "certfile %s" % pki.server.cert_pem,
            "keyfile %s" % pki.server.key_pem,
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
        ]
        if crl:
            self.crl_path = pki.write_crl(self.dir / "crl.pem")
            lines.append("crlfile %s" % self.crl_path)
        if extra:
            lines.append(extra)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o644)
        # pki files must be reachable by the mosquitto user
        for d in (pki.dir, pki.dir.parent):
            with contextlib.suppress(PermissionError):
                d.chmod(d.stat().st_mode | 0o755)

    def start(self) -> Mosquitto:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.log.exists():
            self.log.chmod(0o666)
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
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
