"""Reading a job request's body within its limits, as it streams in.

A JSON body is held in memory up to ``api.max_body_kb``. A multipart body has a ``request`` part
(the same JSON, same limit) and optional file parts, ``melody`` and ``continuation`` (a clip to
continue), each written to a file under ``storage.temp_dir`` chunk by chunk and refused the
moment it passes ``api.max_upload_mb``: an upload is never wholly in memory, and an oversized one
stops at the limit instead of being read to its end. The whole body is held to the request's
limit plus one upload's (a request takes a melody or a continuation, not both); a declared
``Content-Length`` past that is refused before anything is read.

A file is handed to the producer as a path (the workers read it from the shared
``storage.temp_dir``); the beat's temp sweep removes it an hour after its last write.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from pipeline.errors import InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:  # a typing-only name in python-multipart
    from python_multipart.multipart import MultipartCallbacks

KB, MB = 1024, 1024 * 1024
FILE_PARTS = ("melody", "continuation")
PARTS = ("request", *FILE_PARTS)
UPLOAD_PREFIX = "upload-"
# Boundaries and part headers on top of the two parts' own limits.
_MULTIPART_OVERHEAD = 64 * KB
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


@dataclass
class Body:
    """A job request as received: its JSON text and, from a multipart body, its files."""

    request_json: bytes
    melody: Path | None = None
    continuation: Path | None = None
    multipart: bool = False  # the request part may then say which part of a clip to continue

    def files(self) -> list[Path]:
        return [path for path in (self.melody, self.continuation) if path is not None]


def _too_large(what: str, limit: int) -> PayloadTooLarge:
    shown = f"{limit / MB:g} MB" if limit >= MB else f"{limit / KB:g} KB"
    return PayloadTooLarge(f"the {what} is larger than {shown}", what, {"limit_bytes": limit})


def _check_declared_length(request: Request, limit: int, what: str) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(what, limit)


async def read_json(request: Request, limit: int) -> Body:
    """The whole body, at most ``limit`` bytes."""
    _check_declared_length(request, limit, "request")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise _too_large("request", limit)
        body.extend(chunk)
    return Body(bytes(body))


@dataclass
class _Parts:
    """python-multipart's callbacks: they run inside ``parser.write`` and only record; the
    async loop writes the files' bytes (through a worker thread, off the event loop)."""

    request_limit: int
    melody_limit: int  # each file part's
    current: str | None = None
    filenames: dict[str, str] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    request: bytearray = field(default_factory=bytearray)
    sizes: dict[str, int] = field(default_factory=dict)
    pending: list[tuple[str, bytes]] = field(default_factory=list)
    _name: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _disposition: bytes = b""

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.data}

    def begin(self) -> None:
        self.current, self._disposition = None, b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        if bytes(self._name).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._name.clear()
        self._value.clear()

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in PARTS:
            raise InvalidRequest(f"unexpected multipart part {name[:64]!r}; the parts are "
                                 "`request` (the JSON request), `melody` and `continuation` "
                                 "(files)", "request")
        if name in self.seen:
            raise InvalidRequest(f"the multipart part {name!r} appears twice", name)
        self.seen.append(name)
        self.current = name
        if name in FILE_PARTS:
            self.filenames[name] = options.get(b"filename", b"").decode("utf-8", "replace")

    def data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.current == "request":
            if len(self.request) + len(chunk) > self.request_limit:
                raise _too_large("request", self.request_limit)
            self.request += chunk
        elif self.current in FILE_PARTS:
            size = self.sizes[self.current] = self.sizes.get(self.current, 0) + len(chunk)
            if size > self.melody_limit:
                raise _too_large(self.current, self.melody_limit)
            self.pending.append((self.current, chunk))


def _upload_path(folder: Path, filename: str | None) -> Path:
    # The caller's file name gives only a short extension (ffprobe reads the content anyway):
    # nothing of it reaches the path otherwise.
    suffix = Path(filename or "").suffix
    return folder / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}{suffix if _SUFFIX.match(suffix) else ''}"


async def read_multipart(request: Request, *, request_limit: int, melody_limit: int,
                         folder: Path) -> Body:
    """The ``request`` part's JSON and each file part written to a new file in ``folder``
    (removed again if anything is refused)."""
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("a multipart body needs a boundary in its Content-Type",
                             "Content-Type")
    total_limit = request_limit + melody_limit + _MULTIPART_OVERHEAD
    _check_declared_length(request, total_limit, "melody")
    parts = _Parts(request_limit, melody_limit)
    parser = MultipartParser(boundary, parts.callbacks())
    paths: dict[str, Path] = {}
    outs: dict[str, anyio.AsyncFile[bytes]] = {}
    received = 0
    try:
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > total_limit:
                    raise _too_large(parts.current if parts.current in FILE_PARTS else "melody",
                                     melody_limit)
                parser.write(chunk)
                for name, piece in parts.pending:
                    if name not in outs:
                        paths[name] = _upload_path(folder, parts.filenames.get(name))
                        outs[name] = await anyio.open_file(paths[name], "xb")
                    await outs[name].write(piece)
                parts.pending.clear()
            parser.finalize()
        finally:
            for out in outs.values():
                await out.aclose()
        if "request" not in parts.seen:
            raise InvalidRequest("a multipart body needs a `request` part with the JSON "
                                 "request", "request")
        for name in FILE_PARTS:
            if name in parts.seen and name not in paths:
                raise InvalidRequest(f"the {name} part is empty", name)
    except FormParserError as exc:
        _remove(*paths.values())
        raise InvalidRequest("the multipart body is malformed", "request") from exc
    except BaseException:
        _remove(*paths.values())
        raise
    return Body(bytes(parts.request), paths.get("melody"), paths.get("continuation"),
                multipart=True)


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def discard(body: Body) -> None:
    """Remove the uploads of a job that was refused: nothing will ever read them."""
    _remove(*body.files())
