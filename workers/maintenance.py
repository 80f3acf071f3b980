"""Periodic maintenance: a crashed job's temp leftovers, outputs past their retention, and the
ledger's daily roll-up.

Beat (``musicgen-pipeline beat``) sends the two sweeps and the roll-up on the
``musicgen.maintenance`` queue; ``register`` adds them to the worker app and makes every worker
consume that queue as well as its model queue (they take milliseconds, so a GPU worker serves
them between jobs). A sweep runs on whichever worker takes it, so it cleans the folders *that*
worker sees: with several nodes, put ``storage`` on shared storage (as ``docker/compose.yaml``
does) or the other nodes' folders are not swept. On object storage (``storage.url = s3://``)
the output sweep works on the bucket's prefix instead, the same from any node; uploaded melody
inputs are swept with the outputs. The roll-up works on the shared database.

The sweeps are plain functions of a folder and an age (tested on real files), the roll-up a
function of the settings; the tasks only read their settings and return the counts.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery.signals import celeryd_after_setup

from pipeline.config import Settings
from pipeline.config.schema import StorageSettings
from pipeline.contract.output_format import OUTPUT_SUFFIXES  # what JobRunner writes
from pipeline.errors import PipelineError
from pipeline.infra.celery_app import PipelineCelery
from pipeline.infra.storage_backends import StorageBackend, StoredObject, backend_for, local_root
from pipeline.ops.monitor_app import (
    MAINTENANCE_QUEUE,
    TASK_ROLLUP_LEDGER,
    TASK_SWEEP_OUTPUTS,
    TASK_SWEEP_TEMP,
    maintenance_schedule,
)
from pipeline.quota import roll_up
from pipeline.quota.configured import store_for
from pipeline.quota.windows import resolve_zone
from workers.storage import PART_SUFFIX
from workers.typed_celery import receiver, task

log = logging.getLogger(__name__)

TEMP_MAX_AGE_S = 3600.0  # a crashed job's leftovers; a live job's folder is never this old
SIDECAR_SUFFIX = ".json"


@dataclass
class SweepResult:
    """What one sweep removed (files and bytes), and what it could not remove."""

    removed_files: int = 0
    removed_bytes: int = 0
    removed_dirs: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: SweepResult) -> SweepResult:
        for name, value in other.as_dict().items():
            setattr(self, name, getattr(self, name) + value)
        return self


def _newest_mtime(path: Path) -> float:
    """The newest mtime in a tree (the path itself included); links are not followed.

    A job that is still writing anywhere inside its folder keeps the whole folder young.
    """
    newest = path.lstat().st_mtime
    if not path.is_dir() or path.is_symlink():
        return newest
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _tree_size(path: Path) -> tuple[int, int, int]:
    """``(files, bytes, dirs)`` in a tree, counted before it is removed."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return 1, st.st_size, 0
    files = size = 0
    dirs = 1
    for root, subdirs, names in os.walk(path, followlinks=False):
        dirs += len(subdirs)
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
            files += 1
    return files, size, dirs


def _remove(path: Path, result: SweepResult) -> None:
    try:
        files, size, dirs = _tree_size(path)
        if dirs:
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:  # removed by someone else meanwhile: nothing left to do
        return
    except OSError as exc:
        log.warning("maintenance: could not remove %s: %s", path, exc)
        result.errors += 1
        return
    result.removed_files += files
    result.removed_bytes += size
    result.removed_dirs += dirs


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:  # nothing was ever written there
        return []


def sweep_temp(temp_dir: Path, *, older_than: float = TEMP_MAX_AGE_S, output_dir: Path | None = None,
               now: float | None = None) -> SweepResult:
    """Remove every entry directly under ``temp_dir`` whose newest mtime is ``older_than``
    seconds in the past: the per-job folders a killed worker left behind.

    Refuses (``ValueError``) a ``temp_dir`` that is or contains ``output_dir``: sweeping it
    would delete finished outputs an hour after they were written.
    """
    temp_dir = Path(temp_dir).expanduser().resolve()
    if output_dir is not None:
        out = Path(output_dir).expanduser().resolve()
        if out == temp_dir or temp_dir in out.parents:
            raise ValueError(f"storage.temp_dir ({temp_dir}) holds storage.output_dir ({out}): "
                             "refusing to sweep it")
    cutoff = (time.time() if now is None else now) - older_than
    result = SweepResult()
    for entry in _entries(temp_dir):
        try:
            stale = _newest_mtime(entry) < cutoff
        except FileNotFoundError:
            continue
        if stale:
            _remove(entry, result)
    return result


def sweep_outputs(output_dir: Path, *, retention_days: int, part_older_than: float = TEMP_MAX_AGE_S,
                  now: float | None = None) -> SweepResult:
    """Delete outputs older than ``retention_days`` together with their ``.json`` sidecars.

    Only what the pipeline writes is touched: audio files with an output suffix, their
    sidecars (also a sidecar whose audio is already gone), and hidden ``.part`` temp files a
    killed writer left (after ``part_older_than`` seconds). Anything else in the folder stays.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    now = time.time() if now is None else now
    cutoff = now - retention_days * 86400.0
    result = SweepResult()
    for entry in _entries(output_dir):
        try:
            st = entry.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        name = entry.name
        if name.startswith(".") and name.endswith(PART_SUFFIX):
            if st.st_mtime < now - part_older_than:
                _remove(entry, result)
        elif entry.suffix.lower() in OUTPUT_SUFFIXES:
            if st.st_mtime < cutoff:
                _remove(entry, result)
                _remove(entry.with_name(name + SIDECAR_SUFFIX), result)
        elif name.endswith(SIDECAR_SUFFIX):
            audio = entry.with_name(name.removesuffix(SIDECAR_SUFFIX))
            # Only an orphan goes here: a kept output keeps its sidecar, an expired one took it along.
            if audio.suffix.lower() in OUTPUT_SUFFIXES and st.st_mtime < cutoff and not audio.exists():
                _remove(entry, result)
    return result


def sweep_inputs(inputs_dir: Path, *, retention_days: int, now: float | None = None) -> SweepResult:
    """Delete uploaded melodies older than ``retention_days`` (a job's own is deleted when it
    ends: these are a killed worker's leftovers), and ``.part`` files of uploads as old."""
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    result = SweepResult()
    for entry in _entries(Path(inputs_dir).expanduser().resolve()):
        try:
            st = entry.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
            _remove(entry, result)
    return result


def sweep_store(backend: StorageBackend, *, retention_days: int, inputs_prefix: str,
                now: float | None = None) -> SweepResult:
    """The output sweep on object storage: delete what the pipeline wrote under the backend's
    prefix (outputs, their sidecars, uploaded inputs) once older than ``retention_days``.

    Object stores have no partial objects to sweep (an upload appears whole or not at all);
    an unfinished multipart upload is aborted by the uploader, and a bucket lifecycle rule
    (AbortIncompleteMultipartUpload) covers an uploader that died.
    """
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    stale: list[StoredObject] = []
    for item in backend.list():
        name = item.key.rsplit("/", 1)[-1]
        ours = (item.key.startswith(inputs_prefix + "/")
                or ("/" not in item.key and _is_output_name(name)))
        if ours and item.modified < cutoff:
            stale.append(item)
    result = SweepResult()
    try:
        backend.delete(item.key for item in stale)
    except PipelineError as exc:
        log.warning("maintenance: could not delete %d stored objects: %s", len(stale), exc)
        result.errors += len(stale)
        return result
    result.removed_files = len(stale)
    result.removed_bytes = sum(item.size for item in stale)
    return result


def _is_output_name(name: str) -> bool:
    audio = name.removesuffix(SIDECAR_SUFFIX)
    return Path(audio).suffix.lower() in OUTPUT_SUFFIXES


def sweep_results(storage: StorageSettings, *, part_older_than: float = TEMP_MAX_AGE_S,
                  now: float | None = None) -> SweepResult:
    """Beat's output sweep for whichever backend ``storage`` names: outputs, sidecars and
    uploaded inputs past ``retention_days``, in the folder or in the bucket."""
    backend = backend_for(storage)
    days = storage.retention_days
    if backend.local_root is None:
        return sweep_store(backend, retention_days=days, inputs_prefix=storage.inputs_prefix,
                           now=now)
    result = sweep_outputs(backend.local_root, retention_days=days,
                           part_older_than=part_older_than, now=now)
    return result.add(sweep_inputs(backend.local_root / storage.inputs_prefix,
                                   retention_days=days, now=now))


def rollup_ledger(settings: Settings, *, now: datetime | None = None) -> dict[str, Any]:
    """Roll the ledger up for yesterday and today, local days in ``quotas.timezone``.

    Yesterday as well because its last hour, and its jobs that ended after midnight, changed
    after the last run before midnight. A day is final once a run has covered it after it
    ended; beat runs hourly, so only an outage of more than a day leaves one to ``roll_up`` by
    hand. Uses the settings' database, which `musicgen-pipeline db upgrade` set up.
    """
    zone_name = settings.quotas.timezone
    today = (now or datetime.now(UTC)).astimezone(resolve_zone(zone_name)).date()
    days = [today - timedelta(days=1), today]
    store = store_for(settings)
    try:
        rows = sum(roll_up(store.engine, day=day, timezone=zone_name) for day in days)
    finally:
        store.close()
    return {"days": [day.isoformat() for day in days], "rows": rows}


def register(app: PipelineCelery) -> None:
    """Add the sweeps and the roll-up to a worker app, its beat schedule, and the maintenance
    queue to every worker of that app (whatever its ``-Q``)."""
    storage, hard_limit = app.settings.storage, app.settings.worker.hard_time_limit
    # A live job's folder is never older than its hard time limit; an hour covers the default.
    temp_age = max(TEMP_MAX_AGE_S, float(hard_limit))

    # shared=False: a closure over this app's settings must not be added to apps built later.
    @task(app, name=TASK_SWEEP_TEMP, queue=MAINTENANCE_QUEUE, shared=False)
    def sweep_temp_task() -> dict[str, int]:
        root = local_root(storage)
        result = sweep_temp(Path(storage.temp_dir), older_than=temp_age,
                            output_dir=root if root is not None else Path(storage.output_dir))
        log.info("maintenance: temp sweep removed %s", result.as_dict())
        return result.as_dict()

    @task(app, name=TASK_SWEEP_OUTPUTS, queue=MAINTENANCE_QUEUE, shared=False)
    def sweep_outputs_task() -> dict[str, int]:
        result = sweep_results(storage, part_older_than=temp_age)
        log.info("maintenance: output sweep (retention %s days) removed %s",
                 storage.retention_days, result.as_dict())
        return result.as_dict()

    @task(app, name=TASK_ROLLUP_LEDGER, queue=MAINTENANCE_QUEUE, shared=False)
    def rollup_ledger_task() -> dict[str, Any]:
        result = rollup_ledger(app.settings)
        log.info("maintenance: ledger roll-up of %s wrote %d rows", result["days"], result["rows"])
        return result

    app.conf.beat_schedule = maintenance_schedule()

    @receiver(celeryd_after_setup)
    def _consume_maintenance(sender: str, instance: Any, **_: Any) -> None:
        # Celery's documented way to add a queue a worker always consumes, whatever its -Q.
        # queues[name] declares it as a sender's auto-created queue is (its own direct exchange).
        if instance.app is app:
            queues = instance.app.amqp.queues
            queues.select_add(queues[MAINTENANCE_QUEUE])
