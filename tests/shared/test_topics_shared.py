"""The MQTT topic scheme, on CPython (pytest) and MicroPython (tests/mp/run.py)."""

from cityedge_core import topics

DEV = "urn:dev:mac:0024befffe804ff1"


def test_every_topic_of_the_scheme_parses_back():
    for kind in topics.UP_KINDS:
        assert topics.parse(topics.up(DEV, kind)) == (DEV, topics.UP, kind)
    for kind in topics.DOWN_KINDS:
        assert topics.parse(topics.down(DEV, kind)) == (DEV, topics.DOWN, kind)
    assert topics.up(DEV, topics.READINGS) == "ce/v1/" + DEV + "/up/readings"
    assert topics.every_up(topics.RELAY) == "ce/v1/+/up/relay"
    assert topics.every_down(topics.CMD) == "ce/v1/+/down/cmd"


def test_a_prefix_is_honoured_both_ways():
    t = topics.down(DEV, topics.DESIRED, prefix="city/v9")
    assert t == "city/v9/" + DEV + "/down/desired"
    assert topics.parse(t, prefix="city/v9") == (DEV, topics.DOWN, topics.DESIRED)
    assert topics.parse(t) is None


def test_what_is_not_of_the_scheme_is_none():
    for t in ("", "ce/v1", "ce/v1/" + DEV, "ce/v1/" + DEV + "/up", "ce/v1//up/readings",
              "ce/v1/" + DEV + "/up/cmd", "ce/v1/" + DEV + "/down/readings",
              "ce/v1/" + DEV + "/up/readings/x", "ce/v2/" + DEV + "/up/readings",
              "ce/v1/a/b/up/readings", "xce/v1/" + DEV + "/up/readings"):
        assert topics.parse(t) is None, t


def test_a_devices_topics_are_the_schemes_under_its_prefix():
    """What the device agent uses (``Agent.topics``, worked out at boot)."""
    assert topics.device_topics(DEV) == (
        topics.up(DEV, topics.READINGS), topics.up(DEV, topics.STATUS),
        topics.down(DEV, topics.CMD), topics.down(DEV, topics.DESIRED))
    lab = topics.device_topics(DEV, "lab/v1")
    assert [topics.parse(t, prefix="lab/v1") for t in lab] == [
        (DEV, topics.UP, topics.READINGS), (DEV, topics.UP, topics.STATUS),
        (DEV, topics.DOWN, topics.CMD), (DEV, topics.DOWN, topics.DESIRED)]
