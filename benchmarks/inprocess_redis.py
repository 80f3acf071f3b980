"""An in-process stand-in for the few Redis calls a streamed job makes, for benchmarks only.

``benchmarks/streaming.py --redis none`` and ``benchmarks/gpu.py --quick`` use it where no Redis
server runs (the GPU machines have none and no network). It holds what ``StreamPublisher``
(``_begin``: DELETE; ``_xadd``: a pipeline of XADD ... MAXLEN ~ and EXPIRE) and the benchmark's
seam and first-chunk reads (XRANGE) need, as redis-py returns them: entry ids and fields as
bytes, ids ``<ms>-<seq>`` from the wall clock as the server's are. Keys never expire (a
benchmark deletes its own), and MAXLEN trims exactly where Redis may keep a few more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any


def _key(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _bytes(value: str | bytes | int | float) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class InProcessRedis:
    """Streams in a dict; thread-safe (the publisher's thread writes, the benchmark reads)."""

    def __init__(self) -> None:
        self._streams: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        self._lock = threading.Lock()
        self._last = (0, 0)  # the last id's (ms, seq): ids only grow, as a server's do

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self)

    def xadd(self, name: str | bytes, fields: Mapping[Any, Any], maxlen: int | None = None,
             approximate: bool = True) -> bytes:
        with self._lock:
            ms = int(time.time() * 1000)
            ms, seq = (ms, 0) if ms > self._last[0] else (self._last[0], self._last[1] + 1)
            self._last = (ms, seq)
            entry_id = f"{ms}-{seq}".encode()
            entries = self._streams.setdefault(_key(name), [])
            entries.append((entry_id, {_bytes(k): _bytes(v) for k, v in fields.items()}))
            if maxlen is not None and len(entries) > maxlen:
                del entries[:len(entries) - maxlen]
            return entry_id

    def expire(self, name: str | bytes, seconds: int) -> bool:
        with self._lock:
            return _key(name) in self._streams

    def delete(self, *names: str | bytes) -> int:
        with self._lock:
            return sum(self._streams.pop(_key(n), None) is not None for n in names)

    def xrange(self, name: str | bytes, min: str = "-", max: str = "+",  # noqa: A002
               count: int | None = None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        if (min, max) != ("-", "+"):
            raise NotImplementedError("the stand-in reads whole streams only")
        with self._lock:
            entries = list(self._streams.get(_key(name), []))
        return entries if count is None else entries[:count]

    def close(self) -> None:
        pass


class _Pipeline:
    """Queues calls and runs them in order at ``execute``, as redis-py's non-transactional one."""

    def __init__(self, client: InProcessRedis) -> None:
        self._client = client
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def xadd(self, *args: Any, **kwargs: Any) -> _Pipeline:
        self._calls.append(("xadd", args, kwargs))
        return self

    def expire(self, *args: Any, **kwargs: Any) -> _Pipeline:
        self._calls.append(("expire", args, kwargs))
        return self

    def execute(self) -> list[Any]:
        calls, self._calls = self._calls, []
        return [getattr(self._client, name)(*args, **kwargs) for name, args, kwargs in calls]
