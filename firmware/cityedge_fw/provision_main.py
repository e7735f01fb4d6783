"""Provisioning mode with the process's stdin/stdout as the UART (the MicroPython unix port).

``micropython firmware/cityedge_fw/provision_main.py --root DIR --serial SN --device URN
[--model M]`` serves framed provisioning requests on stdin and answers on stdout until
the line closes (stdin at end of file, or the pseudo-terminal hung up); nothing else is
ever written to stdout. Diagnostics go to stderr. On a board, ``main.py`` calls
``board_boot(uart, root, info)``: provisioning mode on the UART while the device is not
locked (unprovisioned, or unlocked by a signed fleet command), then the agent.
"""

import sys

try:
    import select
except ImportError:  # pragma: no cover
    import uselect as select  # type: ignore[no-redef]

if __name__ == "__main__":
    _here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    sys.path.insert(0, _here + "/..")  # the firmware/ directory: cityedge_core, cityedge_fw

READ_MAX = 512  # bytes taken from the line in one read


def stdio_line():
    """``(read, write)`` over fd 0/1: ``read`` blocks for at least one byte, ``b""`` on hang-up."""
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    poller = select.poll()
    poller.register(stdin, select.POLLIN)

    def read():
        buf = bytearray()
        while len(buf) < READ_MAX:
            ready = poller.poll(-1 if not buf else 0)
            if not ready:
                break
            flags = ready[0][1]
            if not flags & select.POLLIN:  # POLLHUP / POLLERR without data
                break
            try:
                b = stdin.read(1)
            except OSError:  # EIO: the other end of the pty is gone
                break
            if not b:
                break
            buf.extend(b)
        return bytes(buf)

    def write(data):
        try:
            stdout.write(data)
            if hasattr(stdout, "flush"):
                stdout.flush()
        except OSError:
            pass  # the line is gone; the next read returns b"" and ends the loop

    return read, write


def uart_line(uart, idle_ms=20):
    """``(read, write)`` over a ``machine.UART`` (a board): ``read`` waits for bytes."""
    import time

    def read():
        while True:
            data = uart.read(READ_MAX)
            if data:
                return data
            time.sleep_ms(idle_ms)  # type: ignore[attr-defined]

    return read, uart.write


def run(root, info, read, write, until_locked=False):
    """Serve provisioning requests until the line closes (or, on a board, until locked)."""
    from cityedge_fw import provision

    prov = provision.Provisioner(root, info)
    print("provisioning mode: %s %s state=%s" % (info["device"], info["serial"], prov.state),
          file=sys.stderr)
    provision.serve(prov, read, write, until_locked)
    print("provisioning mode: line closed (state=%s)" % prov.state, file=sys.stderr)


def board_boot(uart, root, info):
    """For a board's ``main.py``: provisioning mode on ``uart`` unless provisioned.

    Returns True when the device is (now) locked and the agent may start; the caller
    resets after a fresh lock so the agent boots from a clean heap."""
    from cityedge_fw import provision

    if provision.is_locked(root):
        return True
    read, write = uart_line(uart)
    run(root, info, read, write, until_locked=True)
    return provision.is_locked(root)


def _args(argv):
    opts = {"--root": ".", "--model": "ce-sim-1", "--serial": None, "--device": None,
            "--firmware": None}
    i = 1
    while i < len(argv):
        if argv[i] not in opts or i + 1 >= len(argv):
            raise SystemExit("usage: provision_main.py --root DIR --serial SN --device URN "
                             "[--model M] [--firmware V]")
        opts[argv[i]] = argv[i + 1]
        i += 2
    if not opts["--serial"] or not opts["--device"]:
        raise SystemExit("provision_main.py: --serial and --device are required")
    return opts


def main(argv):
    from cityedge_fw.agent import FIRMWARE_VERSION

    o = _args(argv)
    info = {"model": o["--model"], "serial": o["--serial"], "device": o["--device"],
            "firmware": o["--firmware"] or FIRMWARE_VERSION}
    read, write = stdio_line()
    run(o["--root"], info, read, write)


if __name__ == "__main__":
    main(sys.argv)
