"""Per-user webhook signing secrets (pipeline/quota/webhook_secrets.py): kept on SQLite and
PostgreSQL, made with a user's first key and shown once, rotated with an overlap in which both
secrets sign, and used by a real delivery to a real receiver instead of the deployment's."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from typer.testing import CliRunner

from pipeline.cli import app as cli
from pipeline.config.schema import BrokerSettings, DatabaseSettings, Settings, WebhookSettings
from pipeline.errors import WebhookSignatureInvalid
from pipeline.infra.celery_app import make_celery
from pipeline.infra.keys import WEBHOOK_PREFIX
from pipeline.quota import make_engine
from pipeline.quota.configured import prepare_database
from pipeline.quota.webhook_secrets import OVERLAP, WebhookSecrets
from pipeline.webhooks import DeliveryLog, event, verify
from tests.webhook_receiver import receiver
from workers.webhook_task import deliver

pytest_plugins = ["tests.pipeline.quota_conftest"]
pytestmark = pytest.mark.timeout(60)

DEPLOYMENT = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_a_secret_is_made_once_and_rotated_with_an_overlap(quota_db_url: str) -> None:
    engine = make_engine(quota_db_url)
    now = [datetime(2026, 12, 5, 12, tzinfo=UTC)]
    try:
        store = WebhookSecrets(engine, clock=lambda: now[0])
        user = f"user-{uuid.uuid4().hex[:8]}"
        assert store.signing(user) == []
        first = store.ensure(user)
        assert first is not None and first.startswith("whsec_")
        assert store.ensure(user) is None  # never shown again
        assert store.signing(user) == [first]
        second = store.rotate(user)
        assert second != first and store.signing(user) == [second, first]
        now[0] += OVERLAP + timedelta(seconds=1)
        assert store.signing(user) == [second]
    finally:
        engine.dispose()


def test_a_users_delivery_is_signed_with_its_own_secret(tmp_path: Path) -> None:
    settings = Settings(broker=BrokerSettings(url="redis://127.0.0.1:6379/0"),
                        database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'q.db'}"),
                        webhooks=WebhookSettings(allowed_hosts=["127.0.0.1"],  # type: ignore[arg-type]
                                                 secret=DEPLOYMENT))
    prepare_database(settings)
    secrets = WebhookSecrets(make_engine(settings.database.url))
    own = secrets.ensure("cust-1")
    assert own is not None
    app = make_celery(settings)
    job = f"test-hook-{uuid.uuid4().hex}"
    payload = event(job, "succeeded", result={"duration": 1.0})
    try:
        with receiver() as hook:
            log = DeliveryLog(app.redis, 60)
            log.open(job, hook.url, "job.succeeded", f"msg_{job}")
            assert deliver(app, 0, job, hook.url, f"msg_{job}", payload, "cust-1")[0].ok
            mine = hook.received[-1]
            assert verify(mine.body, mine.headers, own) == payload
            # Interop: the Standard Webhooks reference verifies a real delivery as it came.
            assert Webhook(own).verify(mine.body, mine.headers) == payload
            with pytest.raises(WebhookSignatureInvalid):  # the deployment's does not sign it
                verify(mine.body, mine.headers, DEPLOYMENT)
            with pytest.raises(WebhookVerificationError):
                Webhook(DEPLOYMENT).verify(mine.body, mine.headers)
            newer = secrets.rotate("cust-1")
            assert deliver(app, 0, job, hook.url, f"msg_{job}", payload, "cust-1")[0].ok
            both = hook.received[-1]
            assert len(both.headers["webhook-signature"].split()) == 2
            for secret in (newer, own):  # during the overlap either one verifies
                assert verify(both.body, both.headers, secret) == payload
                assert Webhook(secret).verify(both.body, both.headers) == payload
            # A user without one (or a delivery queued before user ids): the deployment's.
            assert deliver(app, 0, job, hook.url, f"msg_{job}", payload, "internal")[0].ok
            assert verify(hook.received[-1].body, hook.received[-1].headers, DEPLOYMENT)
            assert Webhook(DEPLOYMENT).verify(hook.received[-1].body, hook.received[-1].headers)
            assert deliver(app, 0, job, hook.url, f"msg_{job}", payload)[0].ok
            assert verify(hook.received[-1].body, hook.received[-1].headers, DEPLOYMENT)
    finally:
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        client.delete(WEBHOOK_PREFIX + job)
        client.close()
        app.close()


def test_keys_create_shows_the_users_secret_once_and_rotate_replaces_it(
        isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", f"sqlite:///{isolated_settings_env / 'k.db'}")
    runner = CliRunner()
    first = runner.invoke(cli, ["keys", "create", "dora", "--json"])
    assert first.exit_code == 0, first.output
    secret = json.loads(first.stdout)["webhook_secret"]
    assert secret.startswith("whsec_")
    second = runner.invoke(cli, ["keys", "create", "dora", "--json"])
    assert json.loads(second.stdout)["webhook_secret"] is None
    text = runner.invoke(cli, ["keys", "create", "eli"])
    assert "webhook secret: whsec_" in text.stdout
    rotated = runner.invoke(cli, ["keys", "rotate-webhook-secret", "dora", "--json"])
    assert rotated.exit_code == 0, rotated.output
    assert json.loads(rotated.stdout)["webhook_secret"] not in (secret, None)
