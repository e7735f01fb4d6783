"""The unix board's provisioning line, its ``info`` and its flash chip (``hal/unix.py``):
loaded only when the environment names them (``CITYEDGE_UART``, ``CITYEDGE_FLASH_IMAGE``),
so the agent's usual boot does not keep their classes and names on the heap."""

import os
import sys

_READ_POLL_MS = 0  # a UART read never blocks: ``provision_main.uart_line`` idles between


class StdioUart:
    """``machine.UART``'s ``read``/``write`` over fd 0/1 (the pty the laptop opens)."""

    def __init__(self):
        import select

        self._in = sys.stdin.buffer
        self._out = sys.stdout.buffer
        self._poll = select.poll()
        self._poll.register(self._in, select.POLLIN)
        self._pollin = select.POLLIN

    def read(self, n):
        buf = b""
        while len(buf) < n:
            ready = self._poll.poll(_READ_POLL_MS)
            if not ready or not ready[0][1] & self._pollin:
                break
            try:
                b = self._in.read(1)
            except OSError:  # EIO: the other end of the pty is gone
                break
            if not b:
                break
            buf += b
        return buf or None

    def write(self, data):
        try:
            n = self._out.write(data)
            if hasattr(self._out, "flush"):
                self._out.flush()
            return n
        except OSError:  # the line is gone, as a board's UART with no cable
            return 0


class FileFlash:
    """A LittleFS block device over a host file (the simulated flash chip, created erased
    by the host side)."""

    def __init__(self, path, blocks, block_size):
        self.bs = block_size
        self.blocks = blocks
        self.f = open(path, "r+b")

    def readblocks(self, block, buf, offset=0):
        self.f.seek(block * self.bs + offset)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, offset=0):
        self.f.seek(block * self.bs + offset)
        self.f.write(buf)
        self.f.flush()

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.blocks
        if op == 5:  # block size
            return self.bs
        if op == 6:  # erase: LittleFS needs none on a file
            return 0
        return None


def mount_image(spec):
    """Mount the LittleFS image ``PATH:BLOCKS:BLOCK_SIZE`` at ``/flash``; returns ``/flash``."""
    import vfs

    path, blocks, size = spec.rsplit(":", 2)
    flash = FileFlash(path, int(blocks), int(size))
    try:
        vfs.mount(vfs.VfsLfs2(flash), "/flash")
    except OSError:  # a fresh (erased) image: format it, as a board's first boot does
        vfs.VfsLfs2.mkfs(flash)
        vfs.mount(vfs.VfsLfs2(flash), "/flash")
    return "/flash"


def stdio_uart():
    """The provisioning line ``CITYEDGE_UART`` names (``unix.Board.provisioning_uart``)."""
    line = os.getenv("CITYEDGE_UART")
    if line != "stdio":
        raise ValueError("unix board: CITYEDGE_UART=%r: only 'stdio' is supported" % line)
    return StdioUart()


def info(model):
    """What provisioning reports (``unix.Board.info``), from the environment."""
    from .. import VERSION

    device = os.getenv("CITYEDGE_DEVICE")
    serial = os.getenv("CITYEDGE_SERIAL")
    if not device or not serial:
        raise ValueError("unix board: set CITYEDGE_SERIAL and CITYEDGE_DEVICE (what a "
                         "board reads from its chip)")
    return {"model": os.getenv("CITYEDGE_MODEL") or model, "serial": serial,
            "device": device, "firmware": VERSION}
