"""README.md and docs/: every relative link lands on a file and, with a #fragment, on a heading
of that file; the README's commands are the ones CI runs; the README's Python example is the
one tests/integration/test_readme.py runs from docs/python-client.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path) -> str:
    """The page without its code blocks (a `[x](y)` inside one is code, not a link)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped but hyphens, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+?)\s*$", prose(page), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def bash_lines(page: Path) -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]


def test_the_docs_folder_holds_the_pages_the_readme_names() -> None:
    assert len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_lands_on_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (linked.suffix != ".md" or fragment not in anchors(linked)):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    assert not broken, broken


def test_the_readme_gives_the_commands_ci_runs() -> None:
    readme = bash_lines(REPO / "README.md")
    ci_run = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    for command in ("bash .ci/install", ".venv/bin/python -m pytest -n 2 --dist loadfile"):
        assert command in readme and command in ci_run, command


def test_the_readme_shows_the_python_clients_first_example() -> None:
    # One example, two homes; test_readme.py runs the one in docs/, so the copies must not drift.
    def first_python_block(text: str) -> str:
        return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)[0]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    client = (REPO / "docs" / "python-client.md").read_text(encoding="utf-8")
    assert first_python_block(readme) == first_python_block(client)


def test_the_readmes_webhook_receiver_verifies_a_delivery_and_refuses_a_forged_one() -> None:
    # The customer's receiver as the README prints it, fed a delivery signed as a worker signs.
    from standardwebhooks.webhooks import WebhookVerificationError

    from pipeline import webhooks
    from pipeline.quota.webhook_secrets import new_secret

    text = (REPO / "README.md").read_text(encoding="utf-8")
    receiver = next(block for block in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
                    if "def on_delivery" in block)
    secret = new_secret()
    scope: dict[str, object] = {"USER_WEBHOOK_SECRET": secret}
    exec(compile(receiver, "README.md", "exec"), scope)
    on_delivery = scope["on_delivery"]
    payload = webhooks.event("job-1", "succeeded", public_url="https://music.example.com",
                             result={"duration": 8.0, "format": "mp3", "uri": "file:///srv/x"})
    body = webhooks.body_of(payload)
    signed = webhooks.headers(secret, "msg_job-1_succeeded", body)
    event = on_delivery(body, signed)  # type: ignore[operator]
    assert event["data"]["audio_url"] == "https://music.example.com/v1/jobs/job-1/audio"
    assert "uri" not in event["data"]["result"]
    with pytest.raises(WebhookVerificationError):
        on_delivery(body.replace(b"job-1", b"job-2"), signed)  # type: ignore[operator]
