"""A real Redis Sentinel topology on the loopback for the failover tests and benchmarks: a
master, one replica and three sentinels, each a ``redis-server`` process of ours on a free high
port with its own folder. Nothing here touches the shared Redis on 6379.

Sentinel's timings are shortened (``down-after-milliseconds``) so a failover completes in
seconds instead of the production default's half minute, yet stays longer than redis-py's own
retries of a refused connection (about 4 s), so a client meets the outage itself; everything
else is stock.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

MASTER_NAME = "mymaster"
#: How long a master must be silent before the sentinels call it down (production: 30000).
DOWN_AFTER_MS = 5000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class SentinelTopology:
    """Two data nodes (one master, one replica) and three sentinels watching them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port(), free_port(), free_port()]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The ``sentinel://`` broker URL (pipeline/infra/brokers.py's format), database 0."""
        return ";".join(f"sentinel://127.0.0.1:{p}/0" for p in self.sentinel_ports)

    def _spawn(self, port: int, args: list[str]) -> None:
        log = (self.folder / f"{port}.log").open("ab")
        self.procs[port] = subprocess.Popen(
            ["redis-server", *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            start_new_session=True)
        log.close()
        _wait(lambda: self._ping(port), 20, f"redis-server on {port} to answer")

    def start_data(self, port: int, replica_of: int | None = None) -> None:
        folder = self.folder / f"data-{port}"
        folder.mkdir(exist_ok=True)
        args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
                "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._spawn(port, args)

    def start(self) -> None:
        master, replica = self.data_ports
        self.start_data(master)
        self.start_data(replica, replica_of=master)
        _wait(lambda: self.replicas_of(master) == 1, 20, "the replica to sync")
        for port in self.sentinel_ports:
            conf = self.folder / f"sentinel-{port}.conf"  # sentinels rewrite their own config
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n")
            self._spawn(port, [str(conf), "--sentinel"])
        _wait(lambda: all(self._sentinel_sees_replica(p) for p in self.sentinel_ports), 30,
              "every sentinel to see the master, its replica and the other sentinels")

    def _ping(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def _sentinel_sees_replica(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as c:
                fields = c.sentinel_master(MASTER_NAME)
                return (int(fields["num-slaves"]) >= 1
                        and int(fields["num-other-sentinels"]) >= len(self.sentinel_ports) - 1)
        except (redis.RedisError, KeyError):
            return False

    def _sentinel_can_promote(self, port: int) -> bool:
        """This sentinel knows a replica that is up and linked to the master: one it could
        promote (``SENTINEL FAILOVER`` answers NOGOODSLAVE until then)."""
        try:
            with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as c:
                return any(not r["is_sdown"] and not r["is_disconnected"]
                           and r.get("master-link-status") == "ok"
                           for r in c.sentinel_slaves(MASTER_NAME))
        except (redis.RedisError, KeyError):
            return False

    def master_port(self) -> int:
        """The master as the sentinels name it now."""
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as c:
                    addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                    return int(addr[1])
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def replicas_of(self, port: int) -> int:
        with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as c:
            info = c.info("replication")
            return sum(1 for k, v in info.items()
                       if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online")

    def master_client(self) -> redis.Redis:
        return redis.Redis(port=self.master_port(), socket_timeout=2)

    def healthy(self) -> bool:
        """The sentinels agree on a master that answers as one and has an online replica."""
        try:
            port = self.master_port()
            with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as c:
                if c.info("replication")["role"] != "master":
                    return False
            return (self.replicas_of(port) >= 1
                    and all(self._sentinel_can_promote(p) for p in self.sentinel_ports))
        except (redis.RedisError, RuntimeError, KeyError):
            return False

    def kill9_master(self) -> int:
        """SIGKILL the master (no shutdown, no last write); returns its port."""
        port = self.master_port()
        proc = self.procs.pop(port)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return port

    def sentinel_failover(self) -> int:
        """``SENTINEL FAILOVER``: promote the replica in order; returns the old master's port."""
        port = self.master_port()
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=5) as c:
            c.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        return port

    def wait_promoted(self, old: int, timeout: float = 30) -> int:
        """Wait until a node other than ``old`` is the master; returns its port."""
        _wait(lambda: self.master_port() != old, timeout, f"a master other than {old}")
        return self.master_port()

    def rejoin(self, port: int, timeout: float = 30) -> None:
        """Restart a killed node empty; the sentinels make it a replica of the new master."""
        self.start_data(port, replica_of=self.master_port())
        _wait(self.healthy, timeout, "the topology to have a master and an online replica again")

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.procs.clear()
