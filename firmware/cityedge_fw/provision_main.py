"""Provisioning mode with the process's stdin/stdout as the UART (the MicroPython unix port).

``micropython firmware/cityedge_fw/provision_main.py --root DIR --serial SN --device URN
[--model M]`` serves framed provisioning requests on stdin and answers on stdout until
the line closes (stdin at end of file, or the pseudo-terminal hung up); nothing else is
ever written to stdout. Diagnostics go to stderr. On a board, ``main.py`` calls
``board_boot(uart, root, info)``: provisioning mode on the UART while the device is not
locked (unprovisioned, or unlocked by a signed fleet command), then the agent.

While the device holds an offline enrollment ticket (state ``pending-enrollment``), both
entries retry the enrollment themselves between reads of the line (``EnrollRetry``): on
success the device installs the fleet's answer and locks itself; the unix port then
returns (exit), a board resets into the agent.
"""

import gc
import sys

try:
    import select
except ImportError:  # pragma: no cover
    import uselect as select  # type: ignore[no-redef]

if __name__ == "__main__":
    _here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
    sys.path.insert(0, _here + "/..")  # the firmware/ directory: cityedge_core, cityedge_fw

READ_MAX = 512  # bytes taken from the line in one read
# bytes: MicroPython's TLS context (``tls.SSLContext``: mbedTLS's configuration, entropy and
# random generator in one object), as its MemoryError on the unix port reports it
TLS_CONTEXT_BYTES = 3048


def stdio_line():
    """``(read, write)`` over fd 0/1: ``read`` blocks for at least one byte, ``b""`` on hang-up."""
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    poller = select.poll()
    poller.register(stdin, select.POLLIN)

    def read(timeout_ms=-1):
        buf = bytearray()
        while len(buf) < READ_MAX:
            ready = poller.poll(timeout_ms if not buf else 0)
            if not ready:
                if not buf and timeout_ms >= 0:
                    return None  # nothing within timeout_ms: the caller's idle work
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

    def read(timeout_ms=-1):
        waited = 0
        while True:
            data = uart.read(READ_MAX)
            if data:
                return data
            if 0 <= timeout_ms <= waited:
                return None  # nothing within timeout_ms: the caller's idle work
            if hasattr(time, "sleep_ms"):
                time.sleep_ms(idle_ms)  # type: ignore[attr-defined]
            else:  # CPython (tests with a fake UART)
                time.sleep(idle_ms / 1000)
            waited += idle_ms

    return read, uart.write


class EnrollRetry:
    """The ``idle`` work of ``provision_serial.serve`` while a ticket is pending: one
    enrollment attempt whenever its backoff says so (``enroll_http.Enroller``)."""

    def __init__(self, prov, post=None, reset=None, self_test=None):
        self.prov = prov
        self.post = post
        self.reset = reset  # a board's reset: a fragmented heap is rebuilt by a reboot
        self.self_test = self_test  # the SelfTestHook, whose kept block this work frees
        self.enroller = None

    def _log(self, text):
        print(text, file=sys.stderr)

    def due_ms(self):
        return 0 if self.enroller is None else self.enroller.due_ms()

    def run(self):
        if self.self_test is not None:  # a pending device has no self-test: its TLS
            self.self_test.release()  # context's block is room for the enrollment's
        from cityedge_fw import enroll_http

        ticket = self.prov.ticket()
        if ticket is None:  # torn or gone: wait for the technician
            self._log("enroll: the stored ticket is unreadable; back to keyed")
            self.prov.drop_ticket()
            return
        if self.enroller is None:
            self.enroller = enroll_http.Enroller(ticket, self.post or enroll_http.post_json,
                                                 self._log)
        try:
            outcome, value = self.enroller.attempt()
        except Exception as e:  # never die on the boot path: log, back off, retry
            outcome, value = self.enroller._retry("%s: %s" % (type(e).__name__, e))
        if outcome == enroll_http.RETRY and value.startswith("MemoryError") and self.reset:
            self._log("enroll: heap too fragmented for the reply; resetting (the ticket "
                      "is on flash)")
            self.reset()
            return
        if outcome == enroll_http.REFUSED:
            self._log("enroll: the fleet refused the ticket (%s); waiting for the "
                      "technician" % value)
            self.prov.drop_ticket()
            self.enroller = None
        elif outcome == enroll_http.OK:
            try:
                said = self.prov.finish_enrollment(ticket, value)
            except Exception as e:  # a bad answer: the same ticket gets it again later
                self.enroller._retry("cannot install the answer: %s: %s"
                                     % (type(e).__name__, e))
                return
            self._log("enroll: %s" % said)  # stderr: stdout is the line
            self._log("enroll: enrolled after %d failed attempt(s); locked (%d bytes of heap "
                      "free before the POST)" % (self.enroller.attempts,
                                                 self.enroller.heap_free))


class SelfTestHook:
    """``Provisioner``'s ``self_test``: ``provision_selftest.run``, loaded only when the
    step is asked for (the MQTT client, the link and asyncio stay off the heap for the rest
    of provisioning), with the heap block its TLS context needs kept from the start.

    The TLS context is one block of ``TLS_CONTEXT_BYTES``. The key and CSR steps (pure-
    Python P-256) leave the heap cut into smaller pieces: at 96 KiB from ROMFS about 19 KiB
    are free before the self-test, and in 6 of 10 runs measured no piece of them held 3 KiB
    (the self-test then failed at ``tls`` with a ``MemoryError``). So the block is taken
    here, while the heap is still in one piece, and given back right before the context is
    made (``release``, called by the self-test); after a run it is taken again for the
    next (a retry after a refused test). A device waiting for its offline enrollment cannot
    self-test: ``EnrollRetry`` releases the block for the enrollment's own TLS."""

    def __init__(self):
        self.block = None
        self.keep()

    def keep(self):
        try:
            self.block = bytearray(TLS_CONTEXT_BYTES)
        except MemoryError:  # none left in one piece: the self-test takes its chance
            self.block = None

    def release(self):
        self.block = None

    def __call__(self, prov, timeout_s):
        try:
            from cityedge_fw import provision_selftest

            return provision_selftest.run(prov, timeout_s, self.release)
        except MemoryError as e:  # no room to load it: a failed test at its first stage
            return False, "connect", "MemoryError: %s" % (e,), 0
        finally:
            provision_selftest = None
            gc.collect()  # the context's block is free again: kept for a next run
            self.keep()


def run(root, info, read, write, until_locked=False, post=None, reset=None):
    """Serve provisioning requests until the line closes (or, on a board, until locked);
    while a ticket is pending, retry the enrollment between reads (``reset``: a board's
    reset, used when the heap is too fragmented for the fleet's reply)."""
    from cityedge_fw import provision, provision_serial

    self_test = SelfTestHook()
    prov = provision.Provisioner(root, info, self_test=self_test)
    print("provisioning mode: %s %s state=%s" % (info["device"], info["serial"], prov.state),
          file=sys.stderr)
    provision_serial.serve(prov, read, write, until_locked,
                           EnrollRetry(prov, post, reset, self_test))
    print("provisioning mode: line closed (state=%s)" % prov.state, file=sys.stderr)


def board_boot(uart, root, info, post=None, reset=None):
    """For a board's ``main.py``: provisioning mode on ``uart`` unless provisioned (and,
    with a pending ticket, the enrollment retry).

    Returns True when the device is (now) locked and the agent may start; the caller
    resets after a fresh lock so the agent boots from a clean heap."""
    from cityedge_fw import provision

    if provision.is_locked(root):
        return True
    read, write = uart_line(uart)
    run(root, info, read, write, until_locked=True, post=post, reset=reset)
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
    from cityedge_fw import VERSION

    o = _args(argv)
    info = {"model": o["--model"], "serial": o["--serial"], "device": o["--device"],
            "firmware": o["--firmware"] or VERSION}
    read, write = stdio_line()
    run(o["--root"], info, read, write)


if __name__ == "__main__":
    main(sys.argv)
