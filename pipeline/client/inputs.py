"""Audio inputs (melodies, continuation clips) by reference: the producer uploads one to the storage's inputs prefix and
only its URI crosses the broker (a 50 MB melody was a 67 MB Redis message as base64); the
worker deletes it when the job ends, and the retention sweep removes any that are left.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import uuid
from pathlib import Path

from pipeline.config.schema import StorageSettings
from pipeline.contract.jobs import JobSpec, MelodyInput
from pipeline.infra.storage_backends import backend_for

log = logging.getLogger(__name__)
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


def input_key(storage: StorageSettings, job_id: str, suffix: str) -> str:
    """``inputs/<job id>-<random><suffix>``: unique per upload, so a retried enqueue of the
    same id never overwrites an input a queued job still needs."""
    return f"{storage.inputs_prefix}/{job_id}-{uuid.uuid4().hex[:12]}{suffix}"


#: The spec's audio inputs, each travelling by reference the same way.
INPUT_FIELDS = ("melody", "continuation")


def inputs_of(spec: JobSpec) -> list[MelodyInput]:
    """The spec's audio inputs that are set (melody, continuation)."""
    return [value for name in INPUT_FIELDS if (value := getattr(spec, name)) is not None]


def by_reference(spec: JobSpec, storage: StorageSettings) -> JobSpec:
    """The spec with every inline input (bytes or a path) uploaded and replaced by its URI.

    ``StorageUnavailable`` when the storage cannot take one; an input already uploaded for
    this spec is deleted again then.
    """
    stored: dict[str, MelodyInput] = {}
    try:
        for name in INPUT_FIELDS:
            value = getattr(spec, name)
            if value is not None and value.uri is None:
                stored[name] = _upload(value, spec.job_id, storage)
    except BaseException:
        for uploaded in stored.values():
            discard(uploaded, storage)
        raise
    if not stored:
        return spec
    return JobSpec.model_validate({**spec.model_dump(),
                                   **{k: v.model_dump() for k, v in stored.items()}})


def _upload(melody: MelodyInput, job_id: str, storage: StorageSettings) -> MelodyInput:
    backend = backend_for(storage)
    suffix = Path(melody.path).suffix if melody.path else melody.suffix
    key = input_key(storage, job_id, suffix if _SUFFIX.match(suffix) else melody.suffix)
    if melody.path is not None:
        uri = backend.put_file(Path(melody.path), key)
    else:
        uri = backend.put_stream(io.BytesIO(base64.b64decode(melody.data_b64 or "")), key)
    return MelodyInput(uri=uri, owned=True, suffix=key[key.rindex("."):])


def owned_key(melody: MelodyInput | None, storage: StorageSettings) -> str | None:
    """The storage key of an input the pipeline uploaded itself, or None: a caller's own
    melody (or one outside the inputs prefix) is never ours to delete."""
    if melody is None or not melody.owned or melody.uri is None:
        return None
    key = backend_for(storage).key_of(melody.uri)
    if key is None or not key.startswith(storage.inputs_prefix + "/"):
        return None
    return key


def discard(melody: MelodyInput | None, storage: StorageSettings) -> bool:
    """Delete an uploaded input (best effort: the retention sweep is the backstop)."""
    try:
        key = owned_key(melody, storage)
        if key is None:
            return False
        backend_for(storage).delete([key])
        return True
    except Exception:
        log.warning("could not delete input %s", melody.uri if melody else None,
                    exc_info=True)
        return False
