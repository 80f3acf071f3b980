"""Results that reach the caller on another machine: a real worker process writes to a real S3
server (moto's, over HTTP on a loopback port); a caller in its own process and folder uploads a
melody by reference, waits, and a second process elsewhere downloads the result; the webhook
reaches a local receiver signed, after one 500 retried by Celery."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeline.config.schema import StorageSettings
from pipeline.webhooks import verify
from tests.integration.conftest import WorkerFactory, base_env, wait_for
from tests.pipeline.test_melody_by_reference import wav_bytes
from tests.webhook_receiver import receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

ENQUEUE = textwrap.dedent("""
    import json, sys
    import pipeline
    request = json.loads(sys.argv[1])
    request["melody"] = open(sys.argv[2], "rb").read()
    handle = pipeline.enqueue(pipeline.GenerationRequest(**request))
    result = handle.wait(120)
    print(json.dumps({"job_id": handle.id, "result": result.model_dump(mode="json")}))
""")

DOWNLOAD = textwrap.dedent("""
    import hashlib, json, pathlib, sys
    import pipeline
    handle = pipeline.get_job(sys.argv[1])
    pathlib.Path("fetched").mkdir()
    path = handle.download("fetched")  # an existing folder: the file keeps its name
    with handle.open() as stream:
        streamed = stream.read()
    print(json.dumps({"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "streamed_same": streamed == path.read_bytes(),
                      "deliveries": [[d.status, d.attempts] for d in handle.webhook_deliveries()]}))
""")


def _run(code: str, cwd: Path, env: dict[str, str], *args: str) -> dict[str, object]:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_result_is_downloaded_on_another_machine_and_announced_by_webhook(
        workers: WorkerFactory, workdir: Path, redis_url: str, tmp_path: Path,
        s3_storage: StorageSettings) -> None:
    secret_key = s3_storage.secret_access_key.get_secret_value() if s3_storage.secret_access_key else ""
    shared: dict[str, Any] = {"MUSICGEN_STORAGE__URL": s3_storage.url or "",
              "MUSICGEN_STORAGE__ENDPOINT_URL": s3_storage.endpoint_url or "",
              "MUSICGEN_STORAGE__REGION": "us-east-1", "MUSICGEN_STORAGE__ADDRESSING_STYLE": "path",
              "MUSICGEN_STORAGE__ACCESS_KEY_ID": s3_storage.access_key_id or "",
              "MUSICGEN_STORAGE__SECRET_ACCESS_KEY": secret_key,
              "MUSICGEN_WEBHOOKS__ALLOWED_HOSTS": '["127.0.0.1"]',
              "MUSICGEN_WEBHOOKS__SECRET": SECRET, "MUSICGEN_WEBHOOKS__BACKOFF": "0.5"}
    with receiver([500]) as hook:
        worker = workers.start(**shared)
        # The callers' own folders: nothing of the worker's (outputs, temp) is named to them.
        caller_env = base_env(tmp_path / "caller", redis_url, **shared,
                              MUSICGEN_DATABASE__URL=f"sqlite:///{workdir}/quota.db")
        melody = tmp_path / "caller" / "theme.wav"
        melody.parent.mkdir(parents=True)
        melody.write_bytes(wav_bytes(2.0))
        request = {"prompt": "a tune", "model": "tiny-melody", "duration": 1.0, "format": "mp3",
                   "webhook_url": hook.url}
        done = _run(ENQUEUE, tmp_path / "caller", caller_env, json.dumps(request), str(melody))
        result = done["result"]
        assert isinstance(result, dict)
        job_id = str(done["job_id"])
        assert result["uri"] == f"{s3_storage.url}/{job_id}.mp3"
        assert result["output_path"] is None and result["download_url"]
        assert not list((workdir / "outputs").glob(f"{job_id}*"))  # nothing on the worker's disk

        # Celery's retry sends it again after the 500; the second one is taken.
        wait_for(lambda: len(hook.received) >= 2, 60, "the webhook's retry")
        first, second = hook.received[:2]
        assert (first.answered, second.answered) == (500, 200)
        event = verify(second.body, second.headers, SECRET)
        assert event["type"] == "job.succeeded"
        data = event["data"]
        # The public view: the pre-signed download_url, and no bucket URI or path of the server.
        assert data["job_id"] == job_id and data["error"] is None
        assert data["result"]["download_url"] == result["download_url"]
        assert {"uri", "output_path", "sidecar_path"}.isdisjoint(data["result"])
        assert s3_storage.url not in second.body.decode()
        assert data["audio_url"] == f"/v1/jobs/{job_id}/audio"

    fetched = _run(DOWNLOAD, tmp_path / "elsewhere", caller_env, job_id)
    assert Path(str(fetched["path"])) == tmp_path / "elsewhere" / "fetched" / f"{job_id}.mp3"
    assert fetched["streamed_same"] is True and fetched["deliveries"] == [["delivered", 2]]
    with urllib.request.urlopen(str(result["download_url"]), timeout=10) as response:
        by_url = response.read()
    assert hashlib.sha256(by_url).hexdigest() == fetched["sha256"]
    assert by_url[:3] == b"ID3" or by_url[:2] == b"\xff\xfb"  # an mp3 file

    # The uploaded melody went when the job ended: only the result and its sidecar remain.
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_storage.endpoint_url, region_name="us-east-1",
        aws_access_key_id=s3_storage.access_key_id, aws_secret_access_key=secret_key)
    bucket = (s3_storage.url or "").split("/")[2]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
    client.close()
    assert keys == [f"results/{job_id}.mp3", f"results/{job_id}.mp3.json"]
    assert f"webhook of job {job_id} delivered" in worker.log_text()
