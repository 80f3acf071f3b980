"""`musicgen-pipeline keys create|list|revoke`: the HTTP gateway's API keys.

A key is printed once, when it is created; the database keeps only its public prefix and a
hash (pipeline/gateway/keystore.py). ``create --tier`` also puts the user on a quota tier, as
``quota set USER --tier T`` does (per-user limits go back to the tier's).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from pipeline.cli.common import (
    EXIT_FAILED,
    EnvOption,
    JsonOption,
    SetsOption,
    fail,
    load_or_exit,
    parse_sets,
)
from pipeline.cli.db_cmd import open_store, with_store
from pipeline.errors import PipelineError
from pipeline.quota.webhook_secrets import WebhookSecrets

if TYPE_CHECKING:
    from pipeline.gateway.keystore import KeyInfo, NewKey
    from pipeline.quota import QuotaStore

keys_app = typer.Typer(help="API keys of the HTTP gateway (`musicgen-pipeline api`): create, "
                            "list, revoke.", no_args_is_help=True)


def key_dict(info: KeyInfo) -> dict[str, Any]:
    """A key as ``list --json`` shows it: never the key or its hash."""
    return {"prefix": info.label, "user_id": info.user_id, "name": info.name,
            "created_at": info.created_at.isoformat(),
            "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None}


@keys_app.command("create")
def create(
    user: str = typer.Argument(..., help="the user the key acts for (quotas, job ownership)"),
    tier: str = typer.Option(None, "--tier", "-t", help="also put USER on this quota tier"),
    name: str = typer.Option(None, "--name", help="a label for the key, e.g. the calling app"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Create a key for USER and print it: this is the only time it is shown."""
    from pipeline.gateway.keystore import ApiKeyStore

    def make(store: QuotaStore) -> tuple[NewKey, str | None, str]:
        if tier is not None:  # first: an unknown tier creates no key
            store.set_quota(user, tier=tier)
        new = ApiKeyStore(store.engine).create(user, name=name)
        # The user's own webhook signing secret, made with its first key (shown once).
        return new, WebhookSecrets(store.engine).ensure(new.info.user_id), store.tier_of(user)

    new, hook_secret, tier_now = with_store(load_or_exit(env, parse_sets(sets)), make)
    if as_json:
        typer.echo(json.dumps({"key": new.key, **key_dict(new.info), "tier": tier_now,
                               "webhook_secret": hook_secret}, indent=2))
        return
    typer.echo(f"key:     {new.key}")
    typer.echo(f"prefix:  {new.info.label}")
    typer.echo(f"user:    {new.info.user_id} (tier {tier_now})")
    if hook_secret is not None:
        typer.echo(f"webhook secret: {hook_secret}  (verifies this user's webhook deliveries)")
    typer.echo("Store the key now: it is not shown again (only its hash is kept).", err=True)


@keys_app.command("rotate-webhook-secret")
def rotate_webhook_secret(
    user: str = typer.Argument(..., help="the user whose webhook signing secret is replaced"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """A new webhook signing secret for USER, printed once; deliveries carry signatures by
    the old one too for 24 hours, so its receiver can switch without refusing any."""
    secret = with_store(load_or_exit(env, parse_sets(sets)),
                        lambda store: WebhookSecrets(store.engine).rotate(user))
    if as_json:
        typer.echo(json.dumps({"user_id": user, "webhook_secret": secret}, indent=2))
        return
    typer.echo(f"webhook secret: {secret}")
    typer.echo("Store it now: it is not shown again. The previous secret still signs for 24 h.",
               err=True)


@keys_app.command("list")
def list_keys(
    user: str = typer.Option(None, "--user", "-u", help="only this user's keys"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Every key's prefix, user, name and state, oldest first (never the key itself)."""
    from pipeline.gateway.keystore import ApiKeyStore

    keys = with_store(load_or_exit(env, parse_sets(sets)),
                      lambda store: ApiKeyStore(store.engine).list(user))
    rows = [key_dict(info) for info in keys]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no keys" + (f" for {user}" if user else ""))
        return
    for row in rows:
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        label = f" ({row['name']})" if row["name"] else ""
        typer.echo(f"{row['prefix']}  {row['user_id']}{label}  created {row['created_at']}  "
                   f"{state}")


@keys_app.command("revoke")
def revoke(
    prefix: str = typer.Argument(..., help="the key's prefix as `keys list` shows it "
                                          "(mgp_1a2b3c4d)"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Revoke a key: every gateway refuses it within 10 s (a gateway process admits a key it
    checked in the last 10 s without asking the database again)."""
    from pipeline.gateway.keystore import ApiKeyStore

    settings = load_or_exit(env, parse_sets(sets))
    try:
        with open_store(settings, must_exist=False) as store:
            info = ApiKeyStore(store.engine).revoke(prefix)
    except PipelineError as exc:
        fail(exc)
    if info is None:
        typer.echo(f"error: no key {prefix!r}", err=True)
        raise typer.Exit(EXIT_FAILED)
    assert info.revoked_at is not None
    typer.echo(f"revoked {info.label} ({info.user_id}) at {info.revoked_at.isoformat()}")
