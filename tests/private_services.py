"""A RabbitMQ node and a PostgreSQL cluster of the test's own, to stop and start.

Outage tests must not stop the services every other test shares, so they
start private ones on other ports, in a temporary directory, and remove them.
"""

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

__all__ = ["PrivateCluster", "PrivatePostgres", "PrivateRabbit", "free_port"]


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port from that
    range can be taken by any outgoing connection before our server binds it."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000..{low}")


def _run(*args: str, user: str | None = None, timeout: float = 120) -> str:
    command = list(args)
    if user is not None and os.geteuid() == 0:
        command = ["runuser", "-u", user, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")
    return done.stdout


class PrivateRabbit:
    """``rabbitmq-server`` as a second node, with the plugin of the lanes' exchange."""

    def __init__(self) -> None:
        self.name = f"budget{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="budget-rabbit-"))
        (self.dir / "enabled_plugins").write_text(
            "[rabbitmq_sharding,rabbitmq_consistent_hash_exchange].\n"
        )
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        return _run("rabbitmqctl", "-n", self.name, *args, timeout=timeout)

    def start(self) -> "PrivateRabbit":
        if os.geteuid() == 0:
            shutil.chown(self.dir, "rabbitmq", "rabbitmq")
            for path in self.dir.iterdir():
                shutil.chown(path, "rabbitmq", "rabbitmq")
        (self.dir / "pid").unlink(missing_ok=True)
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, timeout=60)
        # Waits for the pid file to appear, then for the node to boot.
        self.ctl("wait", str(self.dir / "pid"), "--timeout", "90")
        return self

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "60")

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a crash, not a stop (nothing is flushed)."""
        pid = int((self.dir / "pid").read_text().strip())
        try:
            # Not our child (detached): its pidfd, not waitpid, says when it has died.
            exited = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            os.kill(pid, signal.SIGKILL)
            readable, _, _ = select.select([exited], [], [], 30)
            if not readable:
                raise TimeoutError(f"RabbitMQ VM {pid} survived SIGKILL")
        finally:
            os.close(exited)

    def restart(self, how: str) -> None:
        """``stop_app``/``start_app`` (a graceful restart), or ``kill`` and boot again."""
        if how == "graceful":
            self.stop_app()
            self.start_app()
        elif how == "kill":
            self.kill()
            self.start()
            self.ctl("await_startup", "--timeout", "60")
        else:
            raise ValueError(how)

    def queues(self) -> dict[str, tuple[int, int]]:
        """name -> (messages, consumers)."""
        out = self.ctl("list_queues", "name", "messages", "consumers", "-q", "--no-table-headers")
        result = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                result[parts[0]] = (int(parts[1]), int(parts[2]))
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.ctl("stop", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateCluster:
    """Three private nodes joined into one cluster (``join_cluster``).

    Quorum queues declared after the join have a replica on every node, so
    the cluster keeps serving while any one node restarts.
    """

    def __init__(self, size: int = 3) -> None:
        self.nodes = [PrivateRabbit() for _ in range(size)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> "PrivateCluster":
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.stop_app()
            node.ctl("join_cluster", first.name)
            node.start_app()
        return self

    def running_nodes(self) -> int:
        status = self.nodes[0].ctl("cluster_status", "--formatter", "json")
        return len(json.loads(status).get("running_nodes", []))

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class PrivatePostgres:
    """A throw-away PostgreSQL 15 cluster (initdb) on its own port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="budget-pg-"))
        # Debian keeps initdb and pg_ctl out of PATH, per major version.
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        self.bin = versions[-1].parent if versions else Path("/usr/lib/postgresql/15/bin")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        _run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), *args, user="postgres")

    def start(self) -> "PrivatePostgres":
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        if not (self.dir / "data").exists():
            _run(
                str(self.bin / "initdb"),
                "-D",
                str(self.dir / "data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                user="postgres",
            )
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-o", options, "-l", str(self.dir / "log"), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown. ``immediate``: a crash, as if the server died
        (no checkpoint; the next start replays the WAL)."""
        self._pg_ctl("-m", mode, "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
