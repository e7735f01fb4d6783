"""The MQTT topic scheme, in one place.

=================================  ==========================================  ==========
topic                              what                                        who writes
=================================  ==========================================  ==========
``ce/v1/<device>/up/readings``     the device's own signed batches             the device
``ce/v1/<device>/up/relay``        node batches a gateway forwards unchanged   a gateway
``ce/v1/<device>/up/status``       the device's signed status                  the device
``ce/v1/<device>/up/result``       the signed result of a fleet command        the device
``ce/v1/<device>/up/csr``          a key rotation's CSR and proof              the device
``ce/v1/<device>/down/cmd``        signed fleet commands (QoS 1)               the fleet
``ce/v1/<device>/down/desired``    signed desired settings (retained)          the fleet
=================================  ==========================================  ==========

``<device>`` is the device's RFC 9039 URN, which is also its certificate CN and its MQTT
username and client id at the broker (``batch.check_device_id``: no ``/``, ``+`` or
``#``, so it is always exactly one topic level). The broker lets a device write only
under its own id and read and subscribe only to its own ``down/`` topics
(``cityedge_fleet.broker_acl``).
"""

PREFIX = "ce/v1"
UP = "up"
DOWN = "down"
READINGS = "readings"
RELAY = "relay"
STATUS = "status"
RESULT = "result"
CSR = "csr"
CMD = "cmd"
DESIRED = "desired"
UP_KINDS = (READINGS, RELAY, STATUS, RESULT, CSR)
DOWN_KINDS = (CMD, DESIRED)


def up(device: str, kind: str, prefix: str = PREFIX) -> str:
    """The topic ``device`` publishes ``kind`` on (``readings``, ``relay``, ``status``,
    ``result``, ``csr``)."""
    return "%s/%s/up/%s" % (prefix, device, kind)


def down(device: str, kind: str, prefix: str = PREFIX) -> str:
    """The topic the fleet sends ``kind`` (``cmd``, ``desired``) to ``device`` on."""
    return "%s/%s/down/%s" % (prefix, device, kind)


def device_topics(device: str, prefix: str = PREFIX) -> "tuple[str, str, str, str]":
    """The topics a device's agent uses: ``(up/readings, up/status, down/cmd,
    down/desired)``. Worked out once at boot (``cityedge_fw.main.build``), so the running
    device never loads this module."""
    return (up(device, READINGS, prefix), up(device, STATUS, prefix), down(device, CMD, prefix),
            down(device, DESIRED, prefix))


def every_up(kind: str, prefix: str = PREFIX) -> str:
    """The filter that matches ``kind`` from every device (``ce/v1/+/up/<kind>``)."""
    return "%s/+/up/%s" % (prefix, kind)


def every_down(kind: str, prefix: str = PREFIX) -> str:
    """The filter that matches ``kind`` to every device (``ce/v1/+/down/<kind>``)."""
    return "%s/+/down/%s" % (prefix, kind)


def parse(topic: str, prefix: str = PREFIX) -> "tuple[str, str, str] | None":
    """``(device, direction, kind)`` of a topic of this scheme, else None.

    The device level is returned as it is: the caller checks it names a device
    (``batch.check_device_id``) before trusting it.
    """
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1:].split("/")
    if len(parts) != 3 or not parts[0]:
        return None
    device, direction, kind = parts
    if (direction == UP and kind in UP_KINDS) or (direction == DOWN and kind in DOWN_KINDS):
        return device, direction, kind
    return None
