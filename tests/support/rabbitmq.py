"""A real three-node RabbitMQ cluster for tests, configured by ``broker_rabbitmq`` exactly
as ``cityedge broker config --engine rabbitmq`` writes it, on free loopback ports.

Every node is ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (Debian's ``rabbitmq-server``
package) with its own directory; the cluster has its own Erlang cookie (in its own HOME)
and its own ``epmd`` port, so it never meets the machine's RabbitMQ. A node can be
killed (SIGKILL, as a crash) and started again. A missing package fails the test.

With ``hosts`` (``support.netns.Hosts``) each node runs on a host of its own, as
``cityedge broker config --node-host a,b,c`` lays a cluster out on three machines: the
same ports on every host, long node names (``ce..1@10.213.x.1``), an ``epmd`` on each
host, and the hosts can be partitioned from one another (``hosts.partition``).
``net_ticktime`` (seconds; Erlang's default is 60) is how long a node takes to call a
silent peer gone: a test of partitions sets it short so that a node notices in seconds.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cityedge_fleet import broker_rabbitmq as rmq
from cityedge_fleet.broker import BrokerFiles

from support.mosquitto import TestPKI, free_port
from support.netns import Hosts

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT_S = 240.0
CTL_TIMEOUT_S = 60.0
STRAY_WAIT_S = 1.0  # seconds a stop watches for the cluster's processes outliving it


class RabbitCluster:
    """``count`` RabbitMQ nodes on loopback, TLS only, the fleet's definitions."""

    def __init__(self, pki: TestPKI, identities: list[str], count: int = 3,
                 directory: Path | None = None, crl_file: Path | None = None,
                 hosts: Hosts | None = None, net_ticktime: int | None = None) -> None:
        server = RABBIT_BIN / "rabbitmq-server"
        if not server.exists():
            raise RuntimeError("RabbitMQ is not installed (%s): `make system-deps` installs "
                               "Debian's rabbitmq-server" % server)
        self.pki = pki
        self.dir = directory or Path(tempfile.mkdtemp(prefix="cityedge-rmq-"))
        self.home = self.dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        self.hosts = hosts
        self.net_ticktime = net_ticktime
        prefix = "ce%s" % secrets.token_hex(3)
        server = pki.server
        if hosts is None:
            self.epmd_port = free_port()
            self.nodes = [rmq.Node("%s%d@localhost" % (prefix, i + 1), free_port(),
                                   free_port(), free_port()) for i in range(count)]
        else:  # each host's ports are its own: the defaults, as on a machine
            assert len(hosts.addresses) == count, "a host per node"
            self.epmd_port = 4369
            self.nodes = rmq.nodes(count, host=",".join(hosts.addresses), prefix=prefix)
            server = pki.issue_server("server-" + prefix, hosts.addresses)
        crl = crl_file or pki.write_crl(self.dir / "crl.pem")
        self.files = BrokerFiles(cafile=pki.ca_pem, certfile=server.cert_pem,
                                 keyfile=server.key_pem, crlfile=crl)
        self.node_dirs = rmq.write(self.dir / "conf", self.files, self.nodes,
                                   bind="127.0.0.1" if hosts is None else "0.0.0.0",
                                   identities=identities)
        (self.dir / "cli-env.conf").write_text("# the CLI's: nothing from /etc/rabbitmq\n")
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.epmds: list[subprocess.Popen[bytes]] = []

    def host(self, i: int) -> str:
        """The address node ``i`` listens on."""
        return "127.0.0.1" if self.hosts is None else self.hosts.addresses[i]

    def _on(self, i: int | None, argv: list[str]) -> list[str]:
        return argv if self.hosts is None or i is None else self.hosts.command(i, argv)

    def env(self, i: int | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port), LC_ALL="C.UTF-8")
        if self.net_ticktime is not None:  # the nodes' and the CLI's, which must agree
            ticks = "-kernel net_ticktime %d" % self.net_ticktime
            env.update(RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=ticks, RABBITMQ_CTL_ERL_ARGS=ticks)
        # never the machine's /etc/rabbitmq/rabbitmq-env.conf (here it pins Erlang's
        # distribution to 127.0.0.1): a node's own file, as production starts it, and an
        # empty one for the CLI and epmd
        env["RABBITMQ_CONF_ENV_FILE"] = str(self.dir / "cli-env.conf" if i is None
                                            else self.node_dirs[i] / "rabbitmq-env.conf")
        if i is not None:
            env.update(rmq.env_for(self.nodes[i], self.node_dirs[i]))
        return env

    def start_node(self, i: int) -> None:
        log = (self.node_dirs[i] / "stdout.log").open("ab")
        self.procs[i] = subprocess.Popen(self._on(i, [str(RABBIT_BIN / "rabbitmq-server")]),
                                         env=self.env(i), stdout=log, stderr=log,
                                         start_new_session=True)

    def wait_listening(self, i: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        proc = self.procs[i]
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError("RabbitMQ node %s exited at start: %s"
                                   % (self.nodes[i].name, self.read_log(i)[-3000:]))
            try:
                with socket.create_connection((self.host(i), self.nodes[i].mqtt_port), 0.2):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("RabbitMQ node %s did not listen in %.0f s: %s"
                           % (self.nodes[i].name, timeout_s, self.read_log(i)[-3000:]))

    def start(self) -> RabbitCluster:
        # our own epmd in the foreground (a node would start a daemon nobody stops): one,
        # or one on each host
        for i in [None] if self.hosts is None else range(len(self.nodes)):
            self.epmds.append(subprocess.Popen(
                self._on(i, ["epmd", "-port", str(self.epmd_port)]), env=self.env(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection((self.host(i or 0), self.epmd_port), 0.2):
                        break
                except OSError:
                    time.sleep(0.05)
        # the first node alone, then the others: RabbitMQ 3.10's MQTT plugin tracks client
        # ids in a Raft group that a node joins only if one runs when its plugin starts
        # (nodes started together each make their own, and the later ones answer every
        # CONNECT "server unavailable")
        self.start_node(0)
        self.wait_listening(0)
        for i in range(1, len(self.nodes)):
            self.start_node(i)
        for i in range(1, len(self.nodes)):
            self.wait_listening(i)
        self.await_online()
        # the quorum queue was declared by the node that booted first, perhaps before
        # the others joined: a member on every node (one CLI call: each costs a VM boot)
        self.ctl("eval", "[rabbit_quorum_queue:grow(N, <<\"%s\">>, <<\".*\">>, all) "
                 "|| N <- rabbit_nodes:all_running()]." % rmq.VHOST)
        return self

    def await_online(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every node runs the rabbit app in one cluster. ``await_online_nodes``
        refuses at once on a node without the app, and a node that listened can be
        without it a moment later (a bench's cluster once failed its start so; the cause
        was not found: ``pause_minority`` stops the app of a node that sees no majority):
        asked again until ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.ctl("await_online_nodes", str(len(self.nodes)), "--timeout", "60")
                return
            except RuntimeError as e:
                if "app to be running" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def ctl(self, *args: str, node: int = 0, tool: str = "rabbitmqctl",
            stdin: str | None = None, env: dict[str, str] | None = None) -> str:
        names = ["--longnames"] if rmq.long_names([self.nodes[node].name]) else []
        out = subprocess.run([str(RABBIT_BIN / tool), *names, "-n", self.nodes[node].name,
                              *args],
                             env=env or self.env(), input=stdin, capture_output=True,
                             text=True, timeout=CTL_TIMEOUT_S)
        if out.returncode != 0:
            raise RuntimeError("%s %s: %s %s" % (tool, " ".join(args), out.stdout, out.stderr))
        return out.stdout

    def queues(self, *args: str, node: int = 0) -> str:
        return self.ctl(*args, node=node, tool="rabbitmq-queues")

    def alive(self) -> int:
        """A node index that runs."""
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                return i
        raise RuntimeError("no RabbitMQ node runs")

    def revoke(self, cn: str) -> None:
        """Immediate revocation: the CRL file (already naming the certificate) installed
        where every node reads it on each handshake, the user deleted and its sessions
        closed."""
        rmq.install_crl(self.files.crlfile, self.dir / "conf" / rmq.CRL_DIR)
        node = self.alive()
        self.ctl("delete_user", cn, node=node)
        self.ctl("close_all_user_connections", cn, "revoked", node=node)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def pause(self, i: int) -> None:
        """Freeze node ``i`` (SIGSTOP to its process group): its sockets stay open and
        nothing on them is answered, as in a VM stall or a node cut off from everything."""
        proc = self.procs[i]
        assert proc is not None and proc.poll() is None, "node %d does not run" % i
        os.killpg(proc.pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)

    def queue_leader(self, queue: str, node: int = 0) -> str:
        """The node that leads ``queue`` (a quorum queue) now. One ``eval``, not
        ``list_queues``: that one streams its rows from every node to the CLI's own Erlang
        node, which nodes on other hosts cannot reach here (its name is this machine's)."""
        out = self.ctl("eval", "{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"%s\">>, "
                       "queue, <<\"%s\">>)), {_, L} = amqqueue:get_pid(Q), L." % (rmq.VHOST, queue),
                       node=node)
        leader = out.strip().strip("'")
        if "@" not in leader:
            raise RuntimeError("no leader for queue %s: %s" % (queue, out))
        return leader

    def read_log(self, i: int) -> str:
        parts = []
        for p in [self.node_dirs[i] / "stdout.log",
                  *sorted((self.node_dirs[i] / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self) -> None:
        for i in range(len(self.nodes)):
            self.kill(i)
        for epmd in self.epmds:
            epmd.kill()
            epmd.wait(10)
        # once (2026-12-05, a chaos run) an ``epmd -daemon`` of the cluster's port was
        # started at the stop and outlived it: whatever still runs with the cluster's own
        # HOME is this cluster's (never the machine's RabbitMQ nor another cluster's)
        deadline = time.monotonic() + STRAY_WAIT_S
        while True:
            for pid in self._strays():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)

    def _strays(self) -> list[int]:
        """Processes whose environment has this cluster's HOME (its nodes, epmd and CLI
        calls get it: ``env``)."""
        mark = b"HOME=" + str(self.home).encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                environ = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mark in environ:
                pids.append(int(d.name))
        return pids
