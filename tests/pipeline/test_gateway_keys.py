"""API keys: the store on SQLite and PostgreSQL (only a hash is kept, revoked keys are refused,
one message for every refusal) and the `keys` commands (in process, on SQLite)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import InvalidRequest, Unauthorized
from pipeline.gateway.keystore import ApiKeyStore, hash_key
from pipeline.quota import make_engine

pytest_plugins = ["tests.pipeline.quota_conftest"]
pytestmark = pytest.mark.timeout(60)


def test_a_key_is_kept_as_a_hash_and_refused_once_revoked(quota_db_url: str) -> None:
    engine = make_engine(quota_db_url)
    try:
        store = ApiKeyStore(engine)
        user = f"user-{uuid.uuid4().hex[:8]}"
        new = store.create(user, name="mobile app")
        prefix, secret = new.key.split("_")[1], new.key.split("_", 2)[2]
        assert new.key.startswith("mgp_") and new.info.label == f"mgp_{prefix}"
        with engine.connect() as conn:
            row = conn.execute(text("select * from api_keys where prefix = :p"),
                               {"p": prefix}).one()
        stored = " ".join(str(value) for value in row)
        assert secret not in stored and hash_key(new.key) in stored  # the hash, never the key
        assert store.authenticate(new.key).user_id == user

        for wrong in (new.key[:-1] + ("A" if new.key[-1] != "A" else "B"), "mgp_" + prefix,
                      "", "x" * 10_000):
            with pytest.raises(Unauthorized) as refused:
                store.authenticate(wrong)
            assert refused.value.message == "the API key is unknown or revoked"

        revoked = store.revoke(new.info.label)
        assert revoked is not None and revoked.revoked_at is not None
        for fresh in (store, ApiKeyStore(engine)):  # this process's cache, and the database
            with pytest.raises(Unauthorized):
                fresh.authenticate(new.key)
        assert store.revoke(prefix) == revoked  # revoking again keeps the first time
        assert store.revoke("mgp_00000000") is None
        with pytest.raises(InvalidRequest):
            store.revoke("../etc")
        listed = store.list(user)
        assert [(k.label, k.name, k.revoked_at is not None) for k in listed] == [
            (new.info.label, "mobile app", True)]
        with pytest.raises(InvalidRequest) as bad_user:
            store.create("bad\x00user")
        assert bad_user.value.field == "user_id"
    finally:
        engine.dispose()


runner = CliRunner()


def test_keys_commands_create_list_and_revoke(isolated_settings_env: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", f"sqlite:///{isolated_settings_env / 'k.db'}")
    refused = runner.invoke(app, ["keys", "create", "alice", "--tier", "gold"])
    assert refused.exit_code == 1 and "unknown tier 'gold'" in refused.output

    made = runner.invoke(app, ["keys", "create", "alice", "--tier", "premium", "--json"])
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    assert created["user_id"] == "alice" and created["tier"] == "premium"
    key, label = created["key"], created["prefix"]
    assert key.startswith(label + "_")

    listed = runner.invoke(app, ["keys", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [(k["prefix"], k["user_id"], k["revoked_at"]) for k in json.loads(listed.stdout)] == [
        (label, "alice", None)]  # the unknown tier created no key
    assert key not in listed.output and key.split("_", 2)[2] not in listed.output

    revoked = runner.invoke(app, ["keys", "revoke", label])
    assert revoked.exit_code == 0 and f"revoked {label} (alice)" in revoked.output
    assert "revoked" in runner.invoke(app, ["keys", "list"]).output
    missing = runner.invoke(app, ["keys", "revoke", "mgp_00000000"])
    assert missing.exit_code == 1 and "no key" in missing.output
    text_out = runner.invoke(app, ["keys", "create", "bob"])
    assert text_out.exit_code == 0 and "key:     mgp_" in text_out.output
    assert "(tier free)" in text_out.output  # the settings' default tier
