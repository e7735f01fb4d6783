"""A TCP proxy on loopback that a test can cut, as a fibre drop or a 4G link fails.

``LinkProxy(target_port).start()`` listens on a free port and forwards each connection to
``target_host`` (127.0.0.1 unless named):``target_port``. Two ways to fail:

- ``cut(refuse=True)``: every open connection is reset and new ones are refused until
  ``restore()`` (a router that is down: the peer notices at once);
- ``blackhole()``: connections stay open but bytes vanish in both directions until
  ``restore()`` (a silent link: only keep-alive timeouts can notice). Bytes sent into the
  hole are lost, as on a real dead link; TLS and MQTT must cope.

Two ways to degrade: ``delay(s)`` holds every chunk ``s`` seconds before forwarding it (a
slow, congested link), and ``corrupt(n)`` flips one bit in each of the next ``n`` chunks
(a link that garbles bytes: TLS must notice and drop the connection).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

from support.mosquitto import free_port

_CHUNK = 65536


class LinkProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.target_host = target_host
        self.port = free_port()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._refuse = False
        self._hole = False
        self._stop = False
        self.connections = 0  # accepted connections that reached the target
        self.delay_s = 0.0
        self._corrupt = 0
        self.corrupted = 0  # chunks garbled

    def start(self) -> LinkProxy:
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refuse:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection((self.target_host, self.target_port),
                                                    timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop:
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for s in ready:
                    data = s.recv(_CHUNK)
                    if not data:
                        return
                    if self._hole:
                        continue
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    if self._corrupt > 0:
                        with self._lock:
                            if self._corrupt > 0:
                                self._corrupt -= 1
                                self.corrupted += 1
                                data = data[:-1] + bytes([data[-1] ^ 0x10])
                    peers[s].sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))

    def cut(self, refuse: bool = True) -> None:
        """Reset every open connection; refuse new ones until ``restore()``."""
        self._refuse = refuse
        with self._lock:
            pairs = list(self._pairs)
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    def blackhole(self) -> None:
        """Keep connections open but drop every byte until ``restore()``."""
        self._hole = True

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before it is forwarded (0: none)."""
        self.delay_s = seconds

    def corrupt(self, chunks: int) -> None:
        """Flip a bit in each of the next ``chunks`` chunks forwarded."""
        with self._lock:
            self._corrupt = chunks

    def restore(self) -> None:
        self._refuse = False
        self._hole = False
        self.delay_s = 0.0
        with self._lock:
            self._corrupt = 0

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):  # wakes the accept loop (a close alone does not:
            self._listener.shutdown(socket.SHUT_RDWR)  # its thread would block for good)
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a link that is gone rather than a polite FIN."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()
