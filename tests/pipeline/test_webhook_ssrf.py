"""The SSRF guard of ``webhooks.public_hosts`` (pipeline/contract/public_addresses.py): every class of
address a worker must not call is refused, after DNS, when the job is enqueued and again when
the worker connects; a name that turns private between the two (DNS rebinding) reaches
nothing; hosts the operator listed in ``allowed_hosts`` are still allowed as they are."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline import webhooks
from pipeline.client.resolve import resolve
from pipeline.config.schema import Settings, WebhookSettings
from pipeline.contract.jobs import GenerationRequest
from pipeline.contract.public_addresses import HostNotPublic, public_addresses, refusal
from pipeline.errors import InvalidRequest, UnsupportedOption
from tests.webhook_receiver import receiver

pytestmark = pytest.mark.timeout(30)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUBLIC = Settings(webhooks=WebhookSettings(public_hosts=True, secret=SECRET))  # type: ignore[arg-type]

REFUSED = {
    "127.0.0.1": "loopback", "127.8.9.10": "loopback", "::1": "loopback",
    "10.1.2.3": "private", "172.16.0.5": "private", "192.168.1.1": "private",
    "fd12:3456::1": "private",
    "169.254.10.20": "link-local", "fe80::1": "link-local",
    "169.254.169.254": "metadata", "fd00:ec2::254": "metadata", "100.100.100.200": "metadata",
    "0.0.0.0": "unspecified", "::": "unspecified",
    "224.0.0.1": "multicast", "ff02::1": "multicast",
    "100.64.0.1": "not a public address",      # carrier-grade NAT
    "192.0.2.7": "private",                     # documentation (TEST-NET-1)
    "::ffff:10.0.0.1": "private", "::ffff:127.0.0.1": "loopback",  # IPv4 inside IPv6
}


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_each_class_of_internal_address_is_refused(address: str) -> None:
    why = refusal(ipaddress.ip_address(address))
    assert why is not None and REFUSED[address] in why


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def _enqueue(url: str, settings: Settings = PUBLIC) -> str | None:
    return resolve(GenerationRequest(prompt="x", webhook_url=url), settings, job_id="j").webhook_url


@pytest.mark.parametrize("url", ["http://localhost:8080/hook", "http://127.0.0.1/",
                                 "http://[::1]:9000/", "http://169.254.169.254/latest/meta-data",
                                 "https://10.0.0.8/x", "http://[::ffff:192.168.0.1]/",
                                 "http://[fd00:ec2::254]/"])
def test_an_internal_receiver_is_refused_at_enqueue(url: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        _enqueue(url)
    assert refused.value.field == "webhook_url" and "only public receivers" in refused.value.message


def test_a_public_receiver_is_allowed_and_listed_hosts_stay_allowed() -> None:
    assert _enqueue("https://93.184.216.34/hook") == "https://93.184.216.34/hook"
    listed = Settings(webhooks=WebhookSettings(public_hosts=True, allowed_hosts=["127.0.0.1"],
                                               secret=SECRET))  # type: ignore[arg-type]
    assert _enqueue("http://127.0.0.1:9/internal", listed) == "http://127.0.0.1:9/internal"
    with pytest.raises(InvalidRequest) as unknown:
        _enqueue("https://no-such-host.invalid/hook")
    assert unknown.value.field == "webhook_url" and "does not resolve" in unknown.value.message
    without_secret = Settings(webhooks=WebhookSettings(public_hosts=True))
    with pytest.raises(UnsupportedOption):  # unsigned events to anyone: off
        _enqueue("https://93.184.216.34/hook", without_secret)


def test_the_worker_refuses_to_connect_to_an_internal_address() -> None:
    event = webhooks.event("j", "succeeded")
    with receiver() as hook:
        target = webhooks.check_target(hook.url, [], public_hosts=True)
        assert isinstance(target, webhooks.Target) and target.public
        outcome = webhooks.post(target.url, "m", event, SECRET, timeout_s=5, public=True)
        assert (outcome.ok, outcome.retryable) == (False, False)
        assert "loopback" in (outcome.error or "")
        assert hook.received == []  # not even a connection that sent a byte
        listed = webhooks.check_target(hook.url, ["127.0.0.1"], public_hosts=True)
        assert isinstance(listed, webhooks.Target) and not listed.public
        assert webhooks.post(listed.url, "m", event, SECRET, timeout_s=5).ok
    assert "allowed_hosts" in str(webhooks.check_target(hook.url, []))


@pytest.fixture
def rebinding(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """``rebind.example`` answers a public address once, then loopback: a DNS rebinding attack
    (the resolver is the one part replaced here; the connection that follows is real)."""
    answers = ["93.184.216.34"]
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)
        address = answers.pop(0) if answers else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield answers


def test_a_name_that_turns_internal_after_enqueue_reaches_nothing(rebinding: list[str]) -> None:
    with receiver() as hook:
        url = hook.url.replace("127.0.0.1", "rebind.example")
        assert _enqueue(url) == url  # public when the request was checked
        outcome = webhooks.post(url, "m", webhooks.event("j", "succeeded"), SECRET,
                                timeout_s=5, public=True)
        assert not outcome.ok and not outcome.retryable and "loopback" in (outcome.error or "")
        assert hook.received == []
    with pytest.raises(HostNotPublic):
        public_addresses("rebind.example", 80)
