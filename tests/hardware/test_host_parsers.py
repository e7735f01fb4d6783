"""Property tests for the host probe's parsers: ``sshd_config`` (first value wins, Match
blocks, includes), APT configuration (scopes, lists, later files override) and systemd
units; and no text makes any of them raise anything but ``HostParseError``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cityedge_hardware.host_parsers import (
    AptConf,
    HostParseError,
    apt_conf_file_used,
    parse_apt_conf,
    parse_sshd_config,
    parse_unit,
    unit_settings,
)

MAIN = "/etc/ssh/sshd_config"
KEYWORDS = st.sampled_from(["PasswordAuthentication", "PermitRootLogin", "UsePAM",
                            "KbdInteractiveAuthentication", "X11Forwarding", "Port",
                            "AllowUsers", "LogLevel"])
VALUES = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_,.*", min_size=1, max_size=12)
SEPARATORS = st.sampled_from([" ", "\t", "=", " = ", "  "])
COMMENTS = st.sampled_from(["", "# a comment", "   ", "#PasswordAuthentication yes"])


def _case(keyword: str, style: int) -> str:
    return [keyword, keyword.lower(), keyword.upper()][style % 3]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(KEYWORDS, VALUES, SEPARATORS, st.integers(0, 2), COMMENTS),
                max_size=20))
def test_sshd_first_value_wins_whatever_the_spelling(
        lines: list[tuple[str, str, str, int, str]]) -> None:
    text = "\n".join("%s%s%s\n%s" % (_case(k, c), sep, v, comment)
                     for k, v, sep, c, comment in lines)
    want: dict[str, str] = {}
    for k, v, _sep, _c, _comment in lines:
        want.setdefault(k.lower(), v)
    assert parse_sshd_config({MAIN: text}).settings == want


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(KEYWORDS, VALUES), max_size=6),
       st.lists(st.tuples(KEYWORDS, VALUES), max_size=6),
       st.lists(st.tuples(KEYWORDS, VALUES), min_size=1, max_size=6))
def test_sshd_includes_read_in_place_and_match_blocks_stay_apart(
        before: list[tuple[str, str]], included: list[tuple[str, str]],
        in_match: list[tuple[str, str]]) -> None:
    def lines(pairs: list[tuple[str, str]]) -> str:
        return "".join("%s %s\n" % p for p in pairs)

    files = {MAIN: lines(before) + "Include sshd_config.d/*.conf\nMatch User backup\n"
             + lines(in_match),
             "/etc/ssh/sshd_config.d/10-a.conf": lines(included)}
    cfg = parse_sshd_config(files)
    want: dict[str, str] = {}
    for k, v in before + included:
        want.setdefault(k.lower(), v)
    block: dict[str, str] = {}
    for k, v in in_match:
        block.setdefault(k.lower(), v)
    assert cfg.settings == want
    assert cfg.matches == [("User backup", block)]


def test_a_match_block_in_an_included_file_ends_with_that_file() -> None:
    files = {MAIN: "Include /etc/ssh/x.conf\nPermitRootLogin no\n",
             "/etc/ssh/x.conf": "Match User a\nPasswordAuthentication yes\n"}
    cfg = parse_sshd_config(files)
    assert cfg.settings == {"permitrootlogin": "no"}
    assert cfg.matches == [("User a", {"passwordauthentication": "yes"})]


NAMES = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                min_size=1, max_size=10)
APT_VALUES = st.text("abcdefghijklmnopqrstuvwxyz0123456789 =,.-_${}/*", max_size=20)


@st.composite
def apt_trees(draw: st.DrawFn) -> list[tuple[list[str], str, object]]:
    """(scope path, name, value or list of items) entries."""
    out = []
    for _ in range(draw(st.integers(0, 8))):
        scope = draw(st.lists(NAMES, min_size=0, max_size=3))
        name = draw(NAMES)
        value: object = draw(st.one_of(APT_VALUES, st.lists(APT_VALUES, min_size=1,
                                                            max_size=4)))
        out.append((scope, name, value))
    return out


def _render(entries: list[tuple[list[str], str, object]], nested: bool, gap: str) -> str:
    parts = []
    for scope, name, value in entries:
        if isinstance(value, list):
            items = gap.join('"%s";' % v for v in value)
            body = "%s {%s%s%s};" % (name, gap, items, gap)
        else:
            body = '%s "%s";' % (name, value)
        if nested:
            for s in reversed(scope):
                body = "%s {%s%s%s};" % (s, gap, body, gap)
            parts.append(body)
        else:
            parts.append("::".join([*scope, ""]) + body if scope else body)
    return ("%s// a comment%s" % (gap, "\n")).join(parts) + "\n"


@settings(max_examples=200, deadline=None)
@given(apt_trees(), st.booleans(), st.sampled_from([" ", "\n", "\n  ", " /* c */ "]))
def test_apt_conf_reads_what_was_written_nested_or_flat(
        entries: list[tuple[list[str], str, object]], nested: bool, gap: str) -> None:
    want = AptConf()
    for scope, name, value in entries:
        full = "::".join([*scope, name]).lower()
        if isinstance(value, list):
            want.lists.setdefault(full, []).extend(value)
        else:
            want.values[full] = value
    got = parse_apt_conf(_render(entries, nested, gap))
    assert got.values == want.values
    assert got.lists == want.lists


def test_a_later_apt_file_overrides_and_clear_removes() -> None:
    conf = parse_apt_conf('APT::Periodic::Unattended-Upgrade "1";\n'
                          'Unattended-Upgrade::Origins-Pattern { "a"; };\n')
    parse_apt_conf('APT { Periodic { Unattended-Upgrade "0"; }; };\n'
                   "#clear Unattended-Upgrade::Origins-Pattern;\n", conf)
    assert conf.values == {"apt::periodic::unattended-upgrade": "0"}
    assert conf.lists == {}


def test_apt_reads_only_the_file_names_it_documents() -> None:
    assert apt_conf_file_used("20auto-upgrades")
    assert apt_conf_file_used("50unattended-upgrades.conf")
    assert not apt_conf_file_used("20auto-upgrades.dpkg-old")
    assert not apt_conf_file_used("20auto-upgrades~")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["User", "NoNewPrivileges", "ReadWritePaths",
                                           "ProtectSystem", "RestrictAddressFamilies"]),
                          st.text("abcdefghijklmnopqrstuvwxyz/_ ", max_size=12)),
                max_size=12))
def test_unit_settings_last_wins_and_lists_add_up(pairs: list[tuple[str, str]]) -> None:
    text = "[Unit]\nDescription=x\n[Service]\n" + "".join(
        "%s=%s\n" % (k, v) for k, v in pairs)
    want: dict[str, str] = {}
    for k, v in pairs:
        v = v.strip()
        if k in ("ReadWritePaths", "RestrictAddressFamilies") and v and want.get(k):
            want[k] = want[k] + " " + v
        else:
            want[k] = v
    assert unit_settings([text]) == want


def test_a_unit_line_continued_with_a_backslash_is_one_setting() -> None:
    rows = parse_unit("[Service]\n# hardening\nReadWritePaths=/a \\\n  /b\n")
    assert rows == [("Service", "ReadWritePaths", "/a  /b", True)]


PIECES = st.sampled_from(["Include", "Match", '"', "'", "=", "{", "}", ";", "#clear",
                          "[Service]", "\\", "a", "/*", "*/", "//", " ", "\n", "::", "#",
                          "x.conf", "*", "\x00", "[", "]"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(PIECES, max_size=40).map("".join)))
def test_no_text_breaks_the_parsers_with_anything_but_their_error(text: str) -> None:
    for parse in (lambda: parse_sshd_config({MAIN: text}), lambda: parse_apt_conf(text),
                  lambda: parse_unit(text)):
        try:
            result = parse()
        except HostParseError:
            continue
        assert result is not None


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["sshd", "passwd", "apt", "unit", "show", "config",
                                        "reference"]),
                       st.one_of(st.text(max_size=200), st.lists(PIECES, max_size=30)
                                 .map("".join)), min_size=1))
def test_any_capture_gets_seven_verdicts_never_an_exception(texts: dict[str, str]) -> None:
    from cityedge_hardware.host_rules import HostCapture, KeyFile, check_host

    cap = HostCapture(sshd_installed=True, passwd=texts.get("passwd"),
                      shadow=[("pi", "hash")] if "passwd" in texts else None,
                      systemctl_show=texts.get("show"),
                      reference_unit=texts.get("reference", ""),
                      config_path="/etc/cityedge/gateway.toml",
                      config_text=texts.get("config"),
                      key_files=[KeyFile("/etc/cityedge/gateway.key", "key", True,
                                         mode=0o100644, uid=5)])
    if "sshd" in texts:
        cap.sshd_files = {MAIN: texts["sshd"]}
    if "apt" in texts:
        cap.apt_files = [("/etc/apt/apt.conf.d/20auto-upgrades", texts["apt"])]
    if "unit" in texts:
        cap.unit_files = [("/etc/systemd/system/cityedge-gateway.service", texts["unit"])]
    verdicts = check_host(cap)
    assert len(verdicts) == 7
    assert all(v.reason for v in verdicts)
