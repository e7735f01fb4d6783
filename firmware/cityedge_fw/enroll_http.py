"""The device enrolls itself from an offline ticket: a minimal HTTP/1.1 POST over TLS.

A technician without a connection hands the device a *ticket* (``provision.Provisioner``
stores it, state ``pending-enrollment``): the one-time enrollment token, the fleet's
``/enroll/ticket`` URL, the CA that signs the fleet's HTTPS certificate, the CSR and what
to register. While the ticket is pending, the boot path calls ``Enroller.due_ms()`` /
``Enroller.attempt()`` between UART reads; each attempt POSTs the ticket and, on
success, the caller installs the answer exactly as the ``install`` step does.

A reply is complete at its ``Content-Length`` (some servers keep a TLS connection open
after ``Connection: close`` until the client's close_notify), else at the server's close.

Transport rules: ``https://`` with the ticket's CA, certificate required (no CA, no
attempt). ``http://`` is accepted only when the ticket says ``dev_http`` (set by the
laptop's explicit ``--dev-http-enroll``, development and tests on loopback only).

Outcomes of one attempt: ``OK`` (the answer, a dict), ``RETRY`` (network down, timeout,
5xx, 429, a reply that is not HTTP or not JSON: a proxy glitch or a captive portal), or
``REFUSED`` (4xx: expired or unknown token, wrong state; retrying cannot help). Retries
wait a doubling delay from ``BACKOFF_FIRST_S`` to ``BACKOFF_MAX_S`` with 50-100 % random
jitter (``backoff.delay_ms``), so a fleet that comes back is not hit by every device at once.

Memory: one request and one reply buffer (``RESPONSE_MAX_BYTES``, allocated once, before
the heap fragments) are held at a time; the fleet's answer is 3.8 KB. Measured on the unix
port (firmware as .mpy, bytecode on the heap): 72 KB free before the POST in
``-X heapsize=192k``. A ``MemoryError`` is retried like a network fault; on a board the
boot path resets instead (``provision_main.EnrollRetry``), the ticket being on flash.
"""

import gc
import json
import time

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:  # CPython

    def const(x):
        return x


from .backoff import delay_ms

CONNECT_TIMEOUT_S = const(10)  # seconds: TCP connect, TLS handshake, each read
RESPONSE_MAX_BYTES = const(8192)  # bytes of a reply (headers + body); measured 3.8 KB
HEADER_MAX_BYTES = const(4096)  # bytes of the status line and headers
BACKOFF_FIRST_S = const(2)  # seconds before the first retry (then doubling)
BACKOFF_MAX_S = const(300)  # seconds: the longest wait between attempts

OK = "ok"
RETRY = "retry"
REFUSED = "refused"


class HttpError(Exception):
    """The fleet's reply was not usable HTTP (a transport fault: retried)."""


class TlsError(HttpError):
    """The server at the enroll URL is not trusted by the ticket's CA (retried: a captive
    portal or an impostor may stand between the device and the fleet)."""


def parse_url(url, dev_http=False):
    """``(tls, host, port, path)`` of an ``https://`` (or, for development, ``http://``) URL."""
    if url.startswith("https://"):
        tls, rest, port = True, url[8:], 443
    elif url.startswith("http://") and dev_http:
        tls, rest, port = False, url[7:], 80
    elif url.startswith("http://"):
        raise ValueError("plain http is refused unless the ticket is for development")
    else:
        raise ValueError("enroll URL must be https://")
    i = rest.find("/")
    hostport, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    if ":" in hostport:
        host, p = hostport.rsplit(":", 1)
        port = int(p)
    else:
        host = hostport
    if not host or not 0 < port < 65536:
        raise ValueError("bad enroll URL %r" % url)
    return tls, host, port, path


_buf = None  # the reply buffer: allocated once, before the heap fragments


def reply_buffer():
    global _buf
    if _buf is None:
        _buf = bytearray(RESPONSE_MAX_BYTES)
    return _buf


def post_json(url, obj, ca_der=None, dev_http=False, timeout_s=CONNECT_TIMEOUT_S):
    """POST ``obj`` as JSON; returns ``(status, body bytes)``. Raises ``OSError`` (network)
    or ``HttpError`` (a reply that is not bounded HTTP/1.x)."""
    import gc
    import socket

    gc.collect()
    tls, host, port, path = parse_url(url, dev_http)
    body = json.dumps(obj).encode()
    head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\nConnection: close\r\nUser-Agent: cityedge-fw\r\n\r\n"
            % (path, host, port, len(body))).encode()
    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    s = socket.socket(ai[0], ai[1])
    try:
        s.settimeout(timeout_s)
        s.connect(ai[-1])
        if tls:
            if not ca_der:
                raise ValueError("https enrollment needs the fleet's CA certificate")
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=ca_der)
            try:
                s = ctx.wrap_socket(s, server_hostname=host)
            except ValueError as e:  # MicroPython: certificate verification failed
                raise TlsError(" ".join(str(e).split())) from e
        if hasattr(s, "write"):
            s.write(head + body)
        else:  # CPython (host-side tests)
            s.sendall(head + body)
        raw = _read_all(s)
    finally:
        s.close()
    return parse_response(raw)


def _read_all(s):
    buf = reply_buffer()
    mv = memoryview(buf)
    n = 0
    total = None
    while True:
        if n == len(buf):
            raise HttpError("reply longer than %d bytes" % RESPONSE_MAX_BYTES)
        got = s.readinto(mv[n:]) if hasattr(s, "readinto") else s.recv_into(mv[n:])
        if not got:
            return mv[:n]
        n += got
        if total is None:
            total = _total_length(mv[:n])
        if total is not None and n >= total:  # whole: don't wait for the server's close
            return mv[:total]


def _total_length(raw):
    """Bytes of the whole reply once its header says (Content-Length), else None."""
    head = bytes(raw[:HEADER_MAX_BYTES])
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    for line in head[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return end + 4 + int(value.strip())
            except ValueError:
                return None  # parse_response says why
    return None  # no length: the reply ends when the server closes


def parse_response(raw):
    """``(status, body)`` of a whole HTTP/1.x reply (``Connection: close``)."""
    head = bytes(raw[:HEADER_MAX_BYTES])  # raw: a memoryview of the reply buffer
    end = head.find(b"\r\n\r\n")
    if end < 0:
        raise HttpError("no HTTP header in the reply")
    lines = head[:end].split(b"\r\n")
    del head
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 \
            or not parts[1].isdigit() or parts[1][0] == 0x30:
        raise HttpError("not an HTTP status line: %r" % lines[0][:40])
    status = int(parts[1])
    body = raw[end + 4:]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            try:
                n = int(value.strip())
            except ValueError:
                raise HttpError("bad Content-Length") from None
            if len(body) < n:
                raise HttpError("reply cut short (%d of %d bytes)" % (len(body), n))
            body = body[:n]
        elif lname == b"transfer-encoding" and value.strip().lower() != b"identity":
            raise HttpError("transfer encoding %r not supported" % value.strip())
    return status, bytes(body)


def _ms():
    try:
        return time.ticks_ms()  # type: ignore[attr-defined]
    except AttributeError:  # CPython
        return int(time.monotonic() * 1000)


def _diff(a, b):
    try:
        return time.ticks_diff(a, b)  # type: ignore[attr-defined]
    except AttributeError:
        return a - b


class Enroller:
    """Attempts and backoff for one ticket (a dict as ``provision`` stored it)."""

    def __init__(self, ticket, post=post_json, log=None):
        self.ticket = ticket
        self.post = post
        self.log = log or (lambda text: None)
        self.attempts = 0
        reply_buffer()  # now, while the heap is still in one piece
        self._next = _ms()  # the first attempt is due at once
        self.last_error = ""
        self.heap_free = -1  # bytes of heap free before the last POST (-1: unknown)

    def due_ms(self):
        """Milliseconds until the next attempt is due (0: now)."""
        d = _diff(self._next, _ms())
        return d if d > 0 else 0

    def attempt(self):
        """One POST. Returns ``(OK, answer)``, ``(RETRY, reason)`` or ``(REFUSED, reason)``."""
        t = self.ticket
        req = {"serial": t["serial"], "token": t["token"], "csr_pem": t["csr_pem"]}
        if t.get("register"):
            req["registration"] = t["register"]
        if hasattr(gc, "mem_free"):  # MicroPython: room for the handshake, measured for the
            gc.collect()  # module docstring (CPython, the tests' host, needs no collection)
            self.heap_free = gc.mem_free()
        try:
            status, body = self.post(t["url"], req, t.get("ca"), bool(t.get("dev_http")))
        except (OSError, HttpError, MemoryError) as e:  # network down, garbage: try again
            return self._retry("%s: %s" % (type(e).__name__, e))
        if hasattr(gc, "mem_free"):
            gc.collect()
        if status == 200:
            try:
                answer = json.loads(body)
                if not isinstance(answer, dict) or not isinstance(
                        answer.get("chain_pem"), str):
                    raise ValueError("no chain_pem")
            except ValueError as e:
                return self._retry("the fleet's answer is not an enrollment: %s" % e)
            return OK, answer
        reason = "HTTP %d: %s" % (status, _detail(body))
        if status == 429 or status >= 500 or status < 400:
            return self._retry(reason)
        self.last_error = reason
        return REFUSED, reason

    def _retry(self, reason):
        wait = delay_ms(self.attempts, BACKOFF_FIRST_S * 1000, BACKOFF_MAX_S * 1000)
        self.attempts += 1
        self.last_error = reason
        self._next = _ms() + wait
        self.log("enroll: attempt %d failed (%s); next in %.1f s"
                 % (self.attempts, reason, wait / 1000))
        return RETRY, reason


def _detail(body):
    try:
        d = json.loads(body)
        if isinstance(d, dict) and "detail" in d:
            return str(d["detail"])[:200]
    except ValueError:
        pass
    return body[:80].decode("utf-8", "replace") if body else "(empty)"


def pem_to_der_list(text):
    """The DER certificates of a PEM bundle, in order."""
    import binascii

    out = []
    begin = "-----BEGIN CERTIFICATE-----"
    end = "-----END CERTIFICATE-----"
    i = text.find(begin)
    while i >= 0:
        j = text.find(end, i)
        if j < 0:
            raise ValueError("PEM certificate without an end line")
        b64 = "".join(text[i + len(begin):j].split())
        out.append(binascii.a2b_base64(b64))
        i = text.find(begin, j)
    if not out:
        raise ValueError("no certificate in the PEM text")
    return out
