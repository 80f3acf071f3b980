"""``workers.outcome.Settler``: each final outcome of a job, settled through every step, on a
real SQLite ledger and real Redis (the webhook's record and message, the breaker, the result
backend), with real files in a temporary storage folder and the in-process metric registry."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import redis
from celery import Task
from celery.exceptions import TimeLimitExceeded
from prometheus_client import REGISTRY

from pipeline import webhooks
from pipeline.config.schema import (
    ApiSettings,
    BrokerSettings,
    Settings,
    StorageSettings,
    WebhookSettings,
)
from pipeline.contract.jobs import JobResult, Timings
from pipeline.errors import InvalidRequest, ModelRuntimeError
from pipeline.infra.celery_app import PipelineCelery, make_celery
from pipeline.infra.keys import WEBHOOK_PREFIX, breaker_key
from pipeline.policies.configured import Policies
from pipeline.quota import DEFAULT_TIERS, QuotaStore, make_engine, upgrade
from pipeline.webhooks import DeliveryLog
from tests.webhook_receiver import receiver
from workers.job_runner import job_outputs, job_temp_dir
from workers.outcome import Settler
from workers.webhook_task import WEBHOOK_QUEUE, JobEvents, deliver

pytestmark = pytest.mark.timeout(60)
REDIS = "redis://127.0.0.1:6379/0"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUBLIC_URL = "https://music.example.com"


@dataclass
class World:
    app: PipelineCelery
    ledger: QuotaStore
    settler: Settler
    job_id: str
    model: str  # a preset of this test's own: its breaker key is nobody else's

    @property
    def payload(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "model": self.model,
                "webhook_url": "http://127.0.0.1:9/hook"}

    def make_files(self) -> list[Path]:
        """What a running job leaves: its scratch folder and a finished output."""
        temp = job_temp_dir(self.app.settings, self.job_id)
        temp.mkdir(parents=True)
        output = job_outputs(self.app.settings, self.job_id)[0]
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(b"RIFF")
        return [temp, output]

    def row(self) -> dict[str, Any]:
        [row] = self.ledger.ledger()
        return dict(row)

    def webhook(self) -> tuple[str, str] | None:
        """The recorded delivery's (event, status), or None when none was queued."""
        rows = DeliveryLog(self.app.redis, 60).read(self.job_id)
        return (rows[0].event, rows[0].status) if rows else None

    def queued_messages(self) -> int:
        return len(_webhook_messages(self.app.redis, self.job_id))

    def jobs_counted(self, outcome: str, code: str) -> float:
        return REGISTRY.get_sample_value("musicgen_jobs_total", {
            "model": self.model, "outcome": outcome, "error_code": code}) or 0.0

    def breaker_failures(self) -> int:
        breaker = Policies.for_app(self.app).breaker(self.model)
        assert breaker is not None
        return int(breaker.status()["failures"])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = Settings(broker=BrokerSettings(url=REDIS),
                        storage=StorageSettings(output_dir=str(tmp_path / "out"),
                                                temp_dir=str(tmp_path / "tmp")),
                        api=ApiSettings(public_url=PUBLIC_URL),
                        webhooks=WebhookSettings(allowed_hosts=["127.0.0.1"],
                                                 secret=SECRET))  # type: ignore[arg-type]
    app = make_celery(settings)
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    upgrade(url)
    ledger = QuotaStore(make_engine(url), tiers=DEFAULT_TIERS, default_tier="free",
                        timezone="UTC")
    tag = uuid.uuid4().hex[:12]
    w = World(app, ledger, Settler(app, lambda: ledger, lambda: Policies.for_app(app)),
              f"settle-{tag}", f"settle-model-{tag}")
    ledger.reserve(job_id=w.job_id, user_id="u1", model=w.model, requested_seconds=4.0)
    client = redis.Redis.from_url(REDIS)
    try:
        yield w
    finally:
        # Our own keys only: the delivery record, the breaker, the job's state and the message.
        client.delete(WEBHOOK_PREFIX + w.job_id, breaker_key(w.model),
                      *client.scan_iter(match=f"{WEBHOOK_PREFIX}{w.job_id}:*"))
        app.backend.forget(w.job_id)
        for key, raw in _webhook_messages(client, w.job_id):
            client.lrem(key, 0, raw)
        client.close()
        ledger.close()
        app.close()


def _webhook_messages(client: Any, job_id: str) -> list[tuple[str, str]]:
    """(list key, message) of each message for ``job_id`` on the webhook queue (every priority
    list of it)."""
    return [(key.decode(), raw.decode()) for key in client.scan_iter(match=f"{WEBHOOK_QUEUE}*")
            if client.type(key) == b"list"
            for raw in client.lrange(key, 0, -1) if job_id.encode() in raw]


def _queued_deliveries(client: Any, job_id: str) -> list[list[Any]]:
    """The arguments of each delivery task queued for ``job_id`` (Celery's message protocol 2:
    a base64 body of [args, kwargs, embed])."""
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
            for _, raw in _webhook_messages(client, job_id)]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _task(app: PipelineCelery) -> Task:
    """What the settler needs of the running task to revoke its job: the result backend."""
    return cast(Task, SimpleNamespace(backend=app.backend, request=None))


def test_a_success_keeps_its_file_and_records_usage(world: World) -> None:
    files = world.make_files()
    before = world.jobs_counted("succeeded", "")
    result = {"model": world.model, "duration": 4.0, "batch_size": 2,
              "timings": {"generate": 1.0, "queue_wait": 0.5}}
    world.settler.succeeded(world.payload, world.job_id, result)
    assert all(path.exists() for path in files)
    row = world.row()
    assert (row["status"], row["gpu_seconds"], row["batch_size"]) == ("succeeded", 0.5, 2)
    assert world.jobs_counted("succeeded", "") == before + 1
    assert world.webhook() == ("job.succeeded", "pending")
    assert world.queued_messages() == 1
    assert world.breaker_failures() == 0  # the admitted pass is settled in run_generate


@pytest.mark.parametrize(("exc", "code"), [
    (ModelRuntimeError("the model failed", None), "model_runtime_error"),
    (InvalidRequest("no such option", "format"), "invalid_request"),
])
def test_a_failure_discards_files_and_refunds(world: World, exc: BaseException,
                                              code: str) -> None:
    files = world.make_files()
    before = world.jobs_counted("failed", code)
    world.settler.failed(world.payload, world.job_id, exc)
    assert not any(path.exists() for path in files)
    row = world.row()
    assert (row["status"], row["error_code"]) == ("failed", code)
    assert world.jobs_counted("failed", code) == before + 1
    assert world.webhook() == ("job.failed", "pending")
    [args] = _queued_deliveries(world.app.redis, world.job_id)
    assert args[3]["data"]["error"] == {"code": code, "message": str(exc.args[0])}
    assert args[3]["data"]["result"] is None and args[3]["data"]["audio_url"] is None
    assert world.breaker_failures() == 0


def test_a_hard_time_limit_is_a_timeout_and_a_verdict_on_the_model(world: World) -> None:
    files = world.make_files()
    before = world.jobs_counted("timeout", "timeout")
    world.settler.failed(world.payload, world.job_id, TimeLimitExceeded(60.0))
    assert not any(path.exists() for path in files)
    assert (world.row()["status"], world.row()["error_code"]) == ("timeout", "timeout")
    assert world.jobs_counted("timeout", "timeout") == before + 1
    assert world.webhook() == ("job.timeout", "pending")
    assert world.breaker_failures() == 1  # the child died: its finally never ran


@pytest.mark.parametrize("ran", [True, False])
def test_a_cancel_is_revoked_refunded_and_announced_but_not_counted(world: World,
                                                                     ran: bool) -> None:
    files = world.make_files()
    counted = {o: world.jobs_counted(o, "cancelled") for o in ("failed", "cancelled")}
    world.settler.cancelled(_task(world.app), world.payload, world.job_id, ran=ran)
    # A job cancelled before it started made no files: whatever is there is not its own run's.
    assert [path.exists() for path in files] == [not ran, not ran]
    assert world.app.backend.get_state(world.job_id) == "REVOKED"
    assert (world.row()["status"], world.row()["error_code"]) == ("cancelled", "cancelled")
    assert {o: world.jobs_counted(o, "cancelled") for o in counted} == counted
    assert world.webhook() == ("job.cancelled", "pending")


def test_the_first_end_wins_and_is_announced_once(world: World) -> None:
    world.settler.failed(world.payload, world.job_id, ModelRuntimeError("failed", None))
    world.settler.cancelled(_task(world.app), world.payload, world.job_id, ran=True)
    assert world.row()["status"] == "failed"
    assert world.webhook() == ("job.failed", "pending")
    assert world.queued_messages() == 1


def test_a_job_without_a_ledger_row_is_still_announced(world: World) -> None:
    other = World(world.app, world.ledger, world.settler, world.job_id + "-norow", world.model)
    try:
        other.settler.failed(other.payload, other.job_id, ModelRuntimeError("failed", None))
        assert other.webhook() == ("job.failed", "pending")
        assert world.row()["status"] == "reserved"  # the other job's end touched no row
    finally:
        redis.Redis.from_url(REDIS).delete(WEBHOOK_PREFIX + other.job_id)


def test_a_delivered_payload_is_the_public_view_and_names_no_server_path(
        world: World, tmp_path: Path) -> None:
    output = job_outputs(world.app.settings, world.job_id)[0]
    # What a job on local storage returns: its paths and a file:// URI.
    result = JobResult(job_id=world.job_id, output_path=str(output),
                       sidecar_path=f"{output}.json", uri=output.as_uri(), format="wav",
                       duration=4.0, sample_rate=32000, channels=1, bit_depth=16,
                       loudness_lufs=-14.0, peak_dbfs=-1.0, model=world.model, seed=7,
                       worker="w1", timings=Timings(generate=1.0)).model_dump(mode="json")
    with receiver() as hook:
        world.settler.succeeded({**world.payload, "webhook_url": hook.url}, world.job_id, result)
        [args] = _queued_deliveries(world.app.redis, world.job_id)
        attempt, _ = deliver(world.app, 0, *args)
        assert attempt.ok, attempt.error
        [got] = hook.received
    event = webhooks.verify(got.body, got.headers, SECRET)
    data = event["data"]
    assert event["type"] == "job.succeeded" and data["status"] == "succeeded"
    leaks = [text for text in _strings(event) if str(tmp_path) in text
             or text.startswith(("/", "file:", "s3:"))]
    assert leaks == []
    assert {"uri", "output_path", "sidecar_path"}.isdisjoint(data["result"])
    assert (data["result"]["seed"], data["result"]["duration"]) == (7, 4.0)
    assert data["audio_url"] == f"{PUBLIC_URL}/v1/jobs/{world.job_id}/audio"
    assert data["error"] is None and data["job_id"] == world.job_id


def test_the_events_a_job_asks_for_are_queued_throttled_delivered_and_listed_in_order(
        world: World) -> None:
    now = [100.0]
    payload = {**world.payload, "webhook_events_filter": ["start", "progress", "partial",
                                                          "completed"]}
    events = JobEvents(world.app, payload, attempt=1, clock=lambda: now[0])
    events.started()
    events.started()  # a redelivery of the same attempt: announced once
    events.progress(0.1, "generating")
    now[0] += 1.0
    events.progress(0.2, "generating")  # within webhooks.progress_interval_s (5 s): not sent
    now[0] += 5.0
    events.progress(0.3, "generating")
    now[0] += 5.0
    events.progress(0.3, "generating")  # nothing new: not sent
    # What workers/partials.py hands over: its uri and path are the server's, never sent.
    events.partial({"uri": "file:///srv/out/x.partial.wav", "path": "/srv/out/x.partial.wav",
                    "seconds": 30.0, "window": 1, "windows": 2, "format": "wav"})
    events.partial({"uri": "file:///srv/out/x.partial.wav", "path": "/srv/out/x.partial.wav",
                    "seconds": 30.0, "window": 1, "windows": 2, "format": "wav"})
    world.settler.succeeded(payload, world.job_id, {"model": world.model, "duration": 4.0,
                                                    "timings": {"generate": 1.0}})
    j = world.job_id
    ids = [f"msg_{j}_started_1", f"msg_{j}_progress_1_1", f"msg_{j}_progress_1_2",
           f"msg_{j}_partial_1", f"msg_{j}_succeeded"]
    log = DeliveryLog(world.app.redis, 60)
    assert [(r.event, r.message_id, r.status) for r in log.read(j)] == list(zip(
        ["job.started", "job.progress", "job.progress", "job.partial", "job.succeeded"], ids,
        ["pending"] * 5, strict=True))
    queued = _queued_deliveries(world.app.redis, j)
    assert sorted(args[2] for args in queued) == sorted(ids)
    with receiver() as hook:
        for job_id, _, message_id, event, user_id in queued:  # to a receiver of this test's
            attempt, _ = deliver(world.app, 0, job_id, hook.url, message_id, event, user_id)
            assert attempt.ok, attempt.error
        got = {r.headers["webhook-id"]: webhooks.verify(r.body, r.headers, SECRET)
               for r in hook.received}
    assert [(r.status, r.attempts) for r in log.read(j)] == [("delivered", 1)] * 5
    assert got[ids[1]]["data"]["progress"] == {"fraction": 0.1, "message": "generating"}
    partial = got[ids[3]]["data"]
    assert partial["partial"] == {"window": 1, "windows": 2, "seconds": 30.0}
    assert partial["partial_url"] == f"{PUBLIC_URL}/v1/jobs/{j}/partial"
    assert not [text for event in got.values() for text in _strings(event)
                if text.startswith(("/", "file:"))]


def test_a_job_gets_only_the_events_it_asked_for(world: World) -> None:
    plain = JobEvents(world.app, world.payload, attempt=1)  # no filter: its end only
    plain.started()
    plain.progress(0.5, "generating")
    assert world.queued_messages() == 0
    started_only = {**world.payload, "webhook_events_filter": ["start"]}
    JobEvents(world.app, started_only, attempt=2).started()
    world.settler.failed(started_only, world.job_id, ModelRuntimeError("failed", None))
    assert [(r.event, r.message_id) for r in DeliveryLog(world.app.redis, 60).read(
        world.job_id)] == [("job.started", f"msg_{world.job_id}_started_2")]
    assert world.queued_messages() == 1


def test_a_hard_killed_streaming_job_ends_its_stream_with_the_error(world: World) -> None:
    """A worker killed mid-stream writes no end; the final failure does (issue 25)."""
    from pipeline.contract.streams import StreamEnd, chunk_fields, parse_entry
    from pipeline.infra.keys import stream_key
    from tests.pipeline.test_handle_stream import _chunk

    key = stream_key(world.job_id)
    world.app.redis.xadd(key, chunk_fields(_chunk(2, 0)))
    try:
        world.settler.failed({**world.payload, "stream": True}, world.job_id,
                             TimeLimitExceeded(60.0))
        last = parse_entry(world.app.redis.xrevrange(key, count=1)[0][1])
        assert last == StreamEnd(2, False, "timeout", last.message)  # type: ignore[union-attr]
        assert world.app.redis.ttl(key) > 0
    finally:
        world.app.redis.delete(key)
