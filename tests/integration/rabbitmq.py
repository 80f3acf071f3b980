"""RabbitMQ for the tests: a vhost of our own on the shared server, or a private node.

The server at 127.0.0.1:5672 (guest/guest) is shared with other people's work: tests only ever
add a vhost of their own (``mg-test-<random>``), and delete that vhost, never anything else.
A test that must stop the broker starts a PRIVATE node (its own node name, ports, data and
config folders) and stops only that node, by name: the system node is never touched.

``rabbitmqctl`` and ``rabbitmq-server`` run as root here; Debian's wrappers switch to the
``rabbitmq`` user, whose Erlang cookie the CLI shares with every node it starts, so a second
node on the same epmd answers the same CLI. A server that is not there fails the tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
USER, PASSWORD = "guest", "guest"


def ctl(*args: str, node: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = ["rabbitmqctl", *(["-n", node] if node else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def add_vhost(prefix: str = "mg-test") -> str:
    """A new vhost with full rights for guest; the caller deletes it (``delete_vhost``)."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    for args in (("add_vhost", vhost), ("set_permissions", "-p", vhost, USER, ".*", ".*", ".*")):
        done = ctl(*args)
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr[-2000:]}"
    return vhost


def delete_vhost(vhost: str, node: str | None = None) -> None:
    assert vhost.startswith("mg-"), vhost  # never anything we did not create
    ctl("delete_vhost", vhost, node=node)


def amqp_url(vhost: str, port: int = AMQP_PORT) -> str:
    """The broker URL without its password (the settings carry it in broker.password)."""
    return f"amqp://{USER}@{AMQP_HOST}:{port}/{vhost}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRabbit:
    """A RabbitMQ node of this test's own: started, stopped and restarted by its node name.

    Its data folder survives a restart, so durable queues and persistent messages come back.
    ``consumer_timeout`` (ms) goes into its rabbitmq.conf, as an operator's would.
    """

    def __init__(self, *, consumer_timeout_ms: int = 3_600_000) -> None:
        self.node = f"mg-{uuid.uuid4().hex[:8]}@localhost"
        self.port, self.dist_port = free_port(), free_port()
        # Not under pytest's tmp_path: the node runs as the rabbitmq user, which cannot enter
        # root's private pytest folders.
        self.folder = Path(tempfile.mkdtemp(prefix="mg-rabbit-"))
        self.folder.chmod(0o755)
        (self.folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {consumer_timeout_ms}\n"
            "loopback_users = none\n")
        (self.folder / "enabled_plugins").write_text("[].\n")  # no management port to collide
        for sub in ("mnesia", "log"):
            (self.folder / sub).mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.folder, "rabbitmq", "rabbitmq")
            for path in self.folder.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self.url = f"amqp://{USER}@{AMQP_HOST}:{self.port}//"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.folder / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.folder / "pid")}

    def start(self, timeout: float = 120) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=60,
                       capture_output=True)
        # -detached returns before the node registers with epmd: await_startup fails fast until
        # it does, then waits for the boot itself.
        deadline = time.monotonic() + timeout
        while ctl("await_startup", "--timeout", "30", node=self.node, timeout=45).returncode != 0:
            assert time.monotonic() < deadline, f"private RabbitMQ did not start:\n{self.log()}"
            time.sleep(0.5)

    def stop(self) -> None:
        done = ctl("stop", node=self.node)
        assert done.returncode == 0, done.stderr[-2000:]
        self.wait_closed()

    def wait_closed(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((AMQP_HOST, self.port), timeout=1).close()
            except OSError:
                return
            assert time.monotonic() < deadline, "private RabbitMQ still listening after stop"
            time.sleep(0.2)

    def log(self) -> str:
        logs = sorted((self.folder / "log").glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs)

    def remove(self) -> None:
        """Stop the node if it still runs and delete its folder."""
        ctl("stop", node=self.node)
        shutil.rmtree(self.folder, ignore_errors=True)
