"""The broker's grants follow the registry on a RabbitMQ cluster (``broker_engine =
"rabbitmq"``): the same ``BrokerAccess`` calls as for Mosquitto (``broker_sync``), made
with ``rabbitmqctl`` over the cluster's Erlang distribution.

Why ``rabbitmqctl`` and not the management HTTP API: the API needs the management plugin
(one more listener on every node, 15671) and a RabbitMQ user with a *password* and the
``administrator`` tag (it takes no client certificate), i.e. a shared password and an open
port that exist for nothing else. ``rabbitmqctl`` speaks Erlang distribution to the nodes'
distribution port, which the cluster has open anyway (node to node), and authenticates
with the cluster's Erlang cookie. That cookie is powerful: whoever holds it runs any code
on every node as the broker's user (docs/BROKERS.md, "The fleet's access to the cluster",
says what it grants and how to limit it).

The calls (each one ``rabbitmqctl`` run, a short-lived Erlang VM: ~1-3 s here):

- ``grant(cn)``: ``import_definitions`` (from stdin) of the identity's user (no password: only its
  certificate logs in), its resource permissions and its topic permissions
  (``broker_rabbitmq.rules_for``), nothing else; importing again is harmless;
- ``cut(cn)``: ``delete_user``, *then* ``close_all_user_connections`` (in that order: a
  device that reconnects between the two is refused, the user is gone);
- ``kick(cn)``: ``close_all_user_connections`` (the grant stays);
- ``install_crl(path)``: one ``eval`` that writes each CRL of the fleet's file (one per
  intermediate in service) under its issuer's hash name into the CRL directory of
  *every* cluster node, each node's own (read from its ``ssl_options``: ``crl_cache``),
  atomically and only when it differs, and removes the CRL of an issuer the file no
  longer holds; a node that does not answer is named in the ``CommandFailed``. Every
  handshake reads that directory: no restart;
- ``reconcile``: one ``eval`` (``definitions``) shows the users and their permissions; a
  device user that should not be there is cut, a device that should be there and is
  missing, or whose permissions differ from its rules, is granted; and the CRL is
  installed again (mends a node that was down when it changed).

Errors: a node that cannot be reached is tried after the next one (``nodes`` in order);
none answering is ``BrokerUnavailable``; a refused command is ``CommandFailed``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session

from cityedge_fleet import broker_acl, broker_rabbitmq
from cityedge_fleet.broker_control import BrokerUnavailable, CommandFailed
from cityedge_fleet.broker_sync import BrokerAccess, Reconciled, desired_devices
from cityedge_fleet.ca import CRL_FILE
from cityedge_fleet.config import Settings

log = logging.getLogger(__name__)

# rabbitmqctl's exit codes (sysexits): the node cannot be reached / did not answer in time
UNREACHABLE = (69, 75)
NO_SUCH_USER = re.compile(r"no_such_user|does not exist")
COOKIE_FILE = ".erlang.cookie"
NODE_NAME = re.compile(r"[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+")

# the Erlang run by ``install_crl`` (as one ``rabbitmqctl eval``): on every cluster node,
# each CRL of the fleet's file written into the directory that node's TLS listener reads
# (its own setting) under its issuer's hash name, through a temporary file and a rename,
# only when it differs; and the CRL files of issuers the fleet's file no longer holds (a
# retired intermediate's) removed. Answers one string, "node status;" per node (written
# when anything changed, same, or the error), plus "node down;" per node that did not
# answer.
_INSTALL_CRL = """
Files = [%(files)s],
Put = fun() ->
    {ok, Opts} = application:get_env(rabbit, ssl_options),
    {ssl_crl_hash_dir, {internal, Conf}} = proplists:get_value(crl_cache, Opts),
    Dir = proplists:get_value(dir, Conf),
    One = fun({Name, Data}) ->
        Path = filename:join(Dir, Name),
        case file:read_file(Path) of
            {ok, Data} -> same;
            _ ->
                Tmp = Path ++ "." ++ atom_to_list(node()) ++ ".tmp",
                ok = file:write_file(Tmp, Data, [sync]),
                ok = file:rename(Tmp, Path),
                written
        end
    end,
    Changed = [S || S <- lists:map(One, Files), S =:= written],
    Wanted = [N || {N, _} <- Files],
    {ok, Present} = file:list_dir(Dir),
    Gone = [ok = file:delete(filename:join(Dir, F)) || F <- Present,
            re:run(F, "^[0-9a-f]{8}[.]r[0-9]+$", [{capture, none}]) =:= match,
            not lists:member(F, Wanted)],
    case Changed ++ Gone of [] -> same; _ -> written end
end,
Run = fun() -> try {node(), Put()} catch C:E -> {node(), {C, E}} end end,
{Answers, Down} = rpc:multicall(rabbit_nodes:all(), erlang, apply, [Run, []], %(ms)d),
lists:flatten([[io_lib:format("~s ~p;", [N, S]) || {N, S} <- Answers, is_atom(N)],
               [io_lib:format("~s down;", [N]) || N <- Down],
               [io_lib:format("? ~p;", [A]) || A <- Answers, not is_tuple(A)]]).
"""


# the part of the cluster's definitions the fleet reads (users, their permissions and topic
# permissions), as JSON in base64, by one ``rabbitmqctl eval``. Not ``export_definitions``:
# with ``definitions.skip_if_unchanged`` the cluster keeps the boot import's hash as a raw
# binary global parameter, which RabbitMQ 3.10's JSON export cannot encode (it fails with
# ``function_clause``). Users are given by name, tags and whether a password is set: no
# password hash leaves the node.
_EXPORT = """
D = rabbit_definitions:all_definitions(),
Get = fun(K, M) -> case M of #{K := V} -> V; _ -> maps:get(atom_to_binary(K), M) end end,
base64:encode_to_string(rabbit_json:encode(#{
    users => [#{name => Get(name, U), tags => Get(tags, U),
                password_set => Get(password_hash, U) =/= <<>>} || U <- maps:get(users, D)],
    permissions => maps:get(permissions, D),
    topic_permissions => maps:get(topic_permissions, D)})).
"""


class RabbitCtl:
    """``rabbitmqctl`` against the first of ``nodes`` that answers.

    ``home`` is the directory holding the cluster's ``.erlang.cookie`` (``rabbitmqctl``
    reads ``$HOME/.erlang.cookie``): it must be the fleet's own, readable by its user only,
    as Erlang itself insists. The cookie never appears on a command line."""

    def __init__(self, nodes: list[str], *, ctl: Path, home: Path, epmd_port: int | None,
                 timeout_s: float) -> None:
        if not nodes:
            raise ValueError("no RabbitMQ node to control")
        for n in nodes:
            if not NODE_NAME.fullmatch(n):
                raise ValueError("%r is not an Erlang node name (name@host)" % n)
        self.nodes = nodes
        self.ctl = ctl
        self.home = home
        self.epmd_port = epmd_port
        self.timeout_s = timeout_s
        # nodes on hosts with full names (``broker config --node-host a.x,b.x,...``)
        self.name_flags = ["--longnames"] if broker_rabbitmq.long_names(nodes) else []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.home), LC_ALL="C.UTF-8")
        if self.epmd_port is not None:
            env["ERL_EPMD_PORT"] = str(self.epmd_port)
        return env

    def run(self, *args: str, stdin: str | None = None) -> str:
        """Run ``rabbitmqctl -n <node> args`` on the first node that answers; its output."""
        why = []
        for node in self.nodes:
            start = time.monotonic()
            try:
                out = subprocess.run(
                    [str(self.ctl), "-q", *self.name_flags, "-n", node, *args, "--timeout",
                     str(int(self.timeout_s))], input=stdin, env=self.env(),
                    capture_output=True, text=True, timeout=self.timeout_s + 30)
                log.debug("rabbitmqctl %s on %s: exit %d in %.2f s", args[0], node,
                          out.returncode, time.monotonic() - start)
            except subprocess.TimeoutExpired:
                why.append("%s: no answer in %.0f s" % (node, self.timeout_s + 30))
                continue
            except OSError as e:
                raise BrokerUnavailable("cannot run %s: %s" % (self.ctl, e)) from e
            if out.returncode == 0:
                return out.stdout
            text = (out.stderr.strip() or out.stdout.strip())[-500:]
            if out.returncode in UNREACHABLE:
                why.append("%s: %s" % (node, text.splitlines()[0] if text else out.returncode))
                continue
            raise CommandFailed("rabbitmqctl %s (%s): %s" % (args[0], node, text))
        raise BrokerUnavailable("no RabbitMQ node answered rabbitmqctl %s: %s"
                                % (args[0], "; ".join(why)))


def check_cookie(home: Path) -> None:
    """The cookie file exists and only its owner may read it (ValueError otherwise)."""
    cookie = home / COOKIE_FILE
    try:
        mode = cookie.stat().st_mode
    except OSError as e:
        raise ValueError("the cluster's Erlang cookie %s: %s" % (cookie, e.strerror)) from e
    if mode & 0o077:
        raise ValueError("the cluster's Erlang cookie %s is mode %03o: it is the key to every "
                         "node, make it 0400 (owner only)" % (cookie, mode & 0o777))


def user_definitions(cn: str) -> dict[str, Any]:
    """The definitions that grant ``cn``: its user and its permissions, nothing else."""
    full = broker_rabbitmq.definitions([cn])
    return {k: full[k] for k in ("users", "permissions", "topic_permissions")}


@dataclass(frozen=True)
class Granted:
    """What the cluster holds for one user (from ``definitions``)."""

    permissions: tuple[str, str, str] | None  # configure, write, read in the vhost
    topic: tuple[str, str] | None  # write, read on amq.topic


def _granted(defs: dict[str, Any]) -> dict[str, Granted]:
    perms = {p["user"]: (p["configure"], p["write"], p["read"])
             for p in defs.get("permissions", []) if p.get("vhost") == broker_rabbitmq.VHOST}
    topic = {p["user"]: (p["write"], p["read"]) for p in defs.get("topic_permissions", [])
             if p.get("vhost") == broker_rabbitmq.VHOST
             and p.get("exchange") == broker_rabbitmq.EXCHANGE}
    return {u["name"]: Granted(perms.get(u["name"]), topic.get(u["name"]))
            for u in defs.get("users", []) if isinstance(u.get("name"), str)}


def as_granted(cn: str) -> Granted:
    r = broker_rabbitmq.rules_for(cn)
    return Granted((r.configure, r.write, r.read), (r.topic_write, r.topic_read))


class RabbitAccess(BrokerAccess):
    """Grants and cuts identities on a RabbitMQ cluster (no-ops without ``ctl``)."""

    def __init__(self, ctl: RabbitCtl | None, crl_file: Path | None = None) -> None:
        super().__init__(None, "")
        self.ctl = ctl
        self.crl_file = crl_file  # installed on every node by ``install_crl``/``reconcile``

    @classmethod
    def from_settings(cls, settings: Settings) -> RabbitAccess:
        s = settings
        nodes = [n.strip() for n in s.broker_rabbitmq_nodes.split(",") if n.strip()]
        if not nodes:
            return cls(None)
        if s.broker_rabbitmq_home is None:
            raise ValueError("CITYEDGE_BROKER_RABBITMQ_NODES needs CITYEDGE_BROKER_RABBITMQ_HOME"
                             " (the directory of the cluster's .erlang.cookie)")
        check_cookie(s.broker_rabbitmq_home)
        ctl = RabbitCtl(nodes, ctl=s.broker_rabbitmq_ctl, home=s.broker_rabbitmq_home,
                        epmd_port=s.broker_rabbitmq_epmd_port,
                        timeout_s=s.limits.broker_rabbitmqctl_timeout_s)
        return cls(ctl, s.ca_dir / CRL_FILE)  # the CA writes it there (``ca.crl_path``)

    @property
    def enabled(self) -> bool:
        return self.ctl is not None

    def _ctl(self, *args: str, stdin: str | None = None) -> str:
        assert self.ctl is not None
        try:
            return self.ctl.run(*args, stdin=stdin)
        except (BrokerUnavailable, CommandFailed):
            self.failures += 1
            raise

    def grant(self, cn: str) -> None:
        if self.ctl is None:
            return
        self._ctl("import_definitions", "--format", "json",  # from stdin
                  stdin=json.dumps(user_definitions(cn)))

    def cut(self, cn: str) -> None:
        if self.ctl is None:
            return
        try:
            self._ctl("delete_user", cn)
        except CommandFailed as e:
            if not NO_SUCH_USER.search(str(e)):
                raise
            self.failures -= 1  # already gone: what was asked
        self.kick(cn)

    def kick(self, cn: str) -> None:
        if self.ctl is None:
            return
        self._ctl("close_all_user_connections", cn, "access to the city broker withdrawn")

    def definitions(self) -> dict[str, Any]:
        """The cluster's users (name, tags, ``password_set``), permissions and topic permissions, as
        ``export_definitions`` would show them (which RabbitMQ 3.10 cannot do once it keeps
        the boot import's hash: ``_EXPORT``)."""
        out = self._ctl("eval", " ".join(_EXPORT.split()))
        try:
            defs = json.loads(base64.b64decode(out.strip().strip('"'), validate=True))
        except ValueError as e:
            raise CommandFailed("the cluster's definitions: not JSON (%s)" % e) from e
        if not isinstance(defs, dict):
            raise CommandFailed("the cluster's definitions: not an object")
        return defs

    def clients(self) -> set[str]:
        if self.ctl is None:
            return set()
        return set(_granted(self.definitions()))

    def install_crl(self, crl_file: Path | None = None) -> dict[str, str]:
        """The CRL into every node's CRL directory; {node: "written" | "same"}.
        CommandFailed names the nodes that did not take it (down, or failing)."""
        path = crl_file or self.crl_file
        if self.ctl is None or path is None:
            return {}
        files = ",".join('{"%s", base64:decode(<<"%s">>)}' % (name, base64.b64encode(pem).decode())
                         for name, pem in broker_rabbitmq.crl_hash_files(path))
        code = _INSTALL_CRL % {"files": files, "ms": int(self.ctl.timeout_s * 1000)}
        out = self._ctl("eval", " ".join(code.split()))
        done: dict[str, str] = {}
        for item in out.strip().strip('"').split(";"):
            if item.strip():
                node, _, status = item.strip().partition(" ")
                done[node] = status
        bad = {n: s for n, s in done.items() if s not in ("written", "same")}
        if bad or not done:
            self.failures += 1
            raise CommandFailed("the CRL is not on every node: %s"
                                % (", ".join("%s %s" % kv for kv in bad.items()) or out))
        return done

    def reconcile(self, session: Session) -> Reconciled:
        done = Reconciled()
        if self.ctl is None:
            return done
        want = desired_devices(session)
        have = {cn: g for cn, g in _granted(self.definitions()).items()
                if broker_acl.identity_kind(cn) == broker_acl.DEVICE}
        for cn in sorted(want):
            if have.get(cn) != as_granted(cn):  # missing, or its permissions changed
                self.grant(cn)
                done.granted.append(cn)
        for cn in sorted(set(have) - want):
            self.cut(cn)
            done.cut.append(cn)
        if self.crl_file is not None and self.crl_file.exists():
            written = [n for n, s in self.install_crl().items() if s == "written"]
            if written:
                log.info("CRL installed on %s", ", ".join(written))
        return done

