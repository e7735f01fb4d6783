"""Provisioning mode's frame loop: framed requests in from a line, replies out on it.

``serve`` knows the line only as two functions (``provision_main`` makes them for the
process's stdio or a board's UART) and the requests only as frames
(``cityedge_core.frame``): every decoded request goes to ``Provisioner.handle`` (the state
machine, ``provision``), every framing fault from the decoder is answered with one error
frame, and each answer is written as one frame. It owns no state of its own but the
decoder's buffer.
"""

from cityedge_core import frame

from .provision import LOCKED, PENDING


def serve(prov, read, write, until_locked=False, idle=None):
    """The UART loop: ``read()`` returns bytes (``b""`` when the line is gone), ``write(b)``.

    Returns when the line is closed (USB unplugged, pty closed), or with ``until_locked``
    right after the reply to a successful ``lock`` (a board then resets into the agent).

    ``idle`` (optional): an object with ``due_ms()`` and ``run()``; then ``read(timeout_ms)``
    returns None when nothing came within ``due_ms()``, and ``idle.run()`` is called (the
    offline enrollment retry). Returns as soon as ``run()`` leaves the device locked.
    """
    dec = frame.FrameDecoder()
    while True:
        if idle is not None and prov.state == PENDING:
            data = read(idle.due_ms())
            if data is None:
                idle.run()
                if prov.state == LOCKED:
                    return
                continue
        else:
            data = read()
        if not data:
            return
        for item in dec.feed(data):
            if isinstance(item, frame.FrameError):
                reply = frame.error_message(item.code, item.message)
            else:
                reply = prov.handle(item)
            write(frame.encode_frame(reply))
            if until_locked and prov.state == LOCKED:
                return
