"""One bounded HTTPS ``GET`` with a byte range, on asyncio, run at boot (``update_boot``):
the update's only HTTP code (a manifest, a key list, a piece of an artifact).

``get(url, start, end, ssl_ctx, buf, sink)`` asks for bytes ``start..end`` (inclusive,
``Range: bytes=start-end``) and hands each piece of the body to ``sink(memoryview)`` as it
arrives, read into the caller's one reused ``buf`` (no allocation per piece). It returns
the number of body bytes handed over, which may be fewer than asked when the link drops
mid-body: the caller keeps them and asks again from there (resume, not restart).

What a server may answer, and what happens:

- ``206`` whose ``Content-Range`` starts at ``start`` and ends at or before ``end``: the
  body is taken;
- ``200`` (a server without Range support): the first ``start`` bytes are read and
  thrown away, then at most ``end - start + 1`` are taken and the connection closed;
- ``206`` with another start (a wrong ``Content-Range``), any other status, a header
  block over ``HEADER_MAX``: ``TransportError`` (the server is not usable);
- a ``Content-Length`` (200) above ``total_max``: ``LimitError`` (endless data: the
  caller's limit, e.g. the manifest's size, is known before a byte is taken);
- a body that does not end: nothing past ``end`` is ever read;
- a server that sends slowly or not at all: the whole request has ``timeout_ms``
  (``asyncio.wait_for_ms``); a trickle cannot hold the device beyond it.

TLS: the device's context (the city CA; a fleet or CDN server certificate chains to it),
the URL's host as the server name.
"""

import asyncio  # MicroPython 1.25+ (ROMFS): no ``uasyncio`` fallback, one name less

from cityedge_core.errors import LimitError, TransportError

try:
    from asyncio import core as _aio
except ImportError:  # CPython: not used there
    _aio = None

HEADER_MAX = 1024  # bytes: the status line and headers of one response


# The connection as ``mqtt_async.open_socket`` and ``send`` make it (a non-blocking
# socket on asyncio's I/O queue), written again here: this module runs at boot
# (``update_boot``), where importing ``mqtt_async`` would bring MQTT's client (about
# 10 KiB with it) onto the heap the download needs.
def open_socket(host, port, ssl_ctx):
    """Awaitable: a non-blocking TLS socket to ``host:port`` (``host`` the server name)."""
    import socket
    from errno import EINPROGRESS

    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(ai[0], ai[1], ai[2])
    sock.setblocking(False)
    try:
        sock.connect(ai[-1])
    except OSError as e:
        if e.errno != EINPROGRESS:
            sock.close()
            raise
    sock = ssl_ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    sock.setblocking(False)
    yield _aio._io_queue.queue_write(sock)  # connected (or failed: the next I/O says)
    return sock


def send(sock, data):
    """Awaitable: all of ``data`` written."""
    mv = memoryview(data)
    off = 0
    while off < len(mv):
        yield _aio._io_queue.queue_write(sock)
        n = sock.write(mv[off:])
        if n is not None:
            off += n


def split_url(url):
    """``https://host[:port]/path`` -> (host, port, path)."""
    rest = url[8:]
    i = rest.find("/")
    hostport, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    host, port = hostport, 443
    j = hostport.rfind(":")
    if j > 0:
        host, port = hostport[:j], int(hostport[j + 1:])
    return host, port, path


def _readinto(sock, mv):
    """Awaitable: bytes read into ``mv`` (0: the peer closed)."""
    while True:
        yield _aio._io_queue.queue_read(sock)
        n = sock.readinto(mv)
        if n is not None:
            return n


def _header(head, name):
    """The value of header ``name`` (lower case bytes) in ``head``, or None."""
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


async def _get(url, start, end, ssl_ctx, buf, sink, total_max):
    host, port, path = split_url(url)
    sock = await open_socket(host, port, ssl_ctx)
    try:
        await send(sock, b"GET %s HTTP/1.1\r\nHost: %s\r\nRange: bytes=%d-%d\r\n"
                   b"Connection: close\r\n\r\n" % (path.encode(), host.encode(), start, end))
        mv = memoryview(buf)
        have = 0
        while True:  # the header block, into the front of ``buf``
            if have >= len(buf) or have >= HEADER_MAX:
                raise TransportError("http: response headers over %d bytes" % HEADER_MAX)
            n = await _readinto(sock, mv[have:min(len(buf), HEADER_MAX)])
            if not n:
                raise TransportError("http: connection closed in the headers")
            have += n
            cut = bytes(mv[:have]).find(b"\r\n\r\n")
            if cut >= 0:
                break
        head = bytes(mv[:cut])
        body = cut + 4
        status = head[9:12]
        skip = 0
        if status == b"206":
            cr = _header(head, b"content-range") or b""
            if not cr.startswith(b"bytes %d-" % start):
                raise TransportError("http: Content-Range %r is not the range asked for"
                                     % cr[:40])
        elif status == b"200":
            skip = start  # no Range support: the whole file comes, from byte 0
            length = _header(head, b"content-length")
            if length is not None and int(length) > total_max:
                raise LimitError("http: %d bytes offered, at most %d expected"
                                 % (int(length), total_max))
        else:
            raise TransportError("http: status %s" % status.decode())
        want = end - start + 1
        taken = 0
        pending = have - body  # body bytes already read with the headers
        mv[:pending] = mv[body:have]
        while True:
            if pending:
                piece = mv[:pending]
                if skip:
                    k = min(skip, pending)
                    skip -= k
                    piece = piece[k:]
                if len(piece) > want - taken:
                    piece = piece[:want - taken]
                if len(piece):
                    sink(piece)
                    taken += len(piece)
            if taken >= want:
                return taken
            pending = await _readinto(sock, mv)
            if not pending:
                return taken  # the link dropped (or the body ended): the caller resumes
    finally:
        sock.close()


async def get(url, start, end, ssl_ctx, buf, sink, timeout_ms, total_max):
    """Bytes ``start..end`` of ``url`` into ``sink``; the count taken (module doc)."""
    return await asyncio.wait_for_ms(_get(url, start, end, ssl_ctx, buf, sink, total_max),
                                     timeout_ms)
