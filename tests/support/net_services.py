"""Services a network-probe test scans, each on a free loopback port.

``TelnetLike``: a thread that greets every connection as a BusyBox telnetd would (IAC
option bytes, a banner with a version, ``login:``). ``OpenSSLServer``: Debian's
``openssl s_server`` offering only TLS 1.0 (at ``@SECLEVEL=0``, or OpenSSL 3 refuses to).
``AnonymousMosquitto``: ``/usr/sbin/mosquitto`` with a plain listener that lets anyone in
(``allow_anonymous true``). The project's own hardened broker is ``support.mosquitto``.
``UdpEcho``: a UDP socket that answers every datagram. All are context managers.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from support.mosquitto import MOSQUITTO, free_port
from support.procs import stop

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
START_TIMEOUT_S = 10.0
TELNET_GREETING = (b"\xff\xfb\x01\xff\xfb\x03\xff\xfd\x18\r\n"
                   b"BusyBox v1.36.1 (Debian 1:1.36.1-9) built-in shell\r\nlogin: ")


def _wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError("the service exited at start: %s" % err)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on port %d after %.0f s" % (port, START_TIMEOUT_S))


class _Managed:
    def __enter__(self) -> _Managed:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


POLL_S = 0.1  # seconds a service thread waits before it looks whether it should stop


class TelnetLike(_Managed):
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(POLL_S)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.sendall(TELNET_GREETING)
                    conn.settimeout(2.0)
                    conn.recv(256)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class OpenSSLServer(_Managed):
    """``openssl s_server`` with ``args`` (e.g. ``-tls1``) and the given certificate."""

    def __init__(self, cert: Path, key: Path, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [OPENSSL, "s_server", "-quiet", "-accept", "127.0.0.1:%d" % self.port,
             "-cert", str(cert), "-key", str(key), *args],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_listening(self.port, self.proc)

    def close(self) -> None:
        stop(self.proc)


class AnonymousMosquitto(_Managed):
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cityedge-anon-mosq-"))
        self.port = free_port()
        conf = self.dir / "mosquitto.conf"
        conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "log_dest none\n" % self.port)
        self.dir.chmod(0o755)
        conf.chmod(0o644)
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_listening(self.port, self.proc)

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class UdpEcho(_Managed):
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(POLL_S)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
                self.sock.sendto(b"echo:" + data, peer)
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
