"""A full firmware image into the ESP32's other OTA partition (``esp32.Partition``):
for a release whose artifact is the whole MicroPython image rather than the ROMFS bundle.

Compile-checked only (``mpy-cross``; there is no ESP32 here): what must be checked on a
board is in docs/BOARD_BRINGUP.md. The trust decisions are the same as for a bundle:
``update_verify`` accepts the manifest, ``update_agent`` downloads in Range requests and
hashes as it writes; this module is only where the bytes go and how the boot switches.

- ``PartitionWriter(size)``: the next OTA partition (``Partition.get_next_update()``),
  refused if ``size`` does not fit; ``write(mv)`` collects pieces into one 4 KiB block
  buffer and writes whole blocks (``writeblocks``: the flash erases a 4 KiB sector at a
  time), ``offset`` is what is written (a resume starts there; the partition has no file
  length, so ``update.json`` keeps it);
- ``finish()`` writes the last, partial block, then ``set_boot()``: the bootloader boots
  it once, on trial (ESP-IDF's ``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE``: the new image
  boots as ``PENDING_VERIFY``; without the option MicroPython's ``set_boot`` still
  switches, but nothing rolls back a crash);
- ``commit()``: the new image is healthy (``update_agent``'s rule):
  ``Partition.mark_app_valid_cancel_rollback()``; a reset before it makes the bootloader
  boot the old image again (its own rollback, replacing the trial-boot counter of the
  A/B slots).
"""

_BLOCK = 4096  # bytes: the ESP32 flash's erase unit and ``Partition``'s block size


class PartitionWriter:
    def __init__(self, size, offset=0):
        from esp32 import Partition  # type: ignore[import-not-found]

        self.part = Partition(Partition.RUNNING).get_next_update()
        blocks = self.part.ioctl(4, 0)  # number of blocks
        if size > blocks * _BLOCK:
            raise ValueError("image of %d bytes does not fit the %d-byte partition"
                             % (size, blocks * _BLOCK))
        if offset % _BLOCK:
            offset -= offset % _BLOCK  # resume at a block boundary: rewrite the partial one
        self.size = size
        self.offset = offset
        self.buf = bytearray(_BLOCK)
        self.fill = 0

    def write(self, mv):
        i = 0
        while i < len(mv):
            n = min(len(mv) - i, _BLOCK - self.fill)
            self.buf[self.fill:self.fill + n] = mv[i:i + n]
            self.fill += n
            i += n
            if self.fill == _BLOCK:
                self._flush()

    def _flush(self):
        if self.fill < _BLOCK:
            for j in range(self.fill, _BLOCK):
                self.buf[j] = 0xFF
        self.part.writeblocks(self.offset // _BLOCK, self.buf)
        self.offset += self.fill
        self.fill = 0

    def finish(self):
        if self.fill:
            self._flush()
        if self.offset != self.size:
            raise ValueError("%d of %d bytes written" % (self.offset, self.size))
        self.part.set_boot()


def commit():
    """The running (new) image is healthy: cancel the bootloader's rollback."""
    from esp32 import Partition  # type: ignore[import-not-found]

    Partition.mark_app_valid_cancel_rollback()
