"""What a job's caller may see of its result: everything but where the server keeps the file.

The HTTP gateway's job view (``pipeline/gateway/models.py``) and the webhook's payload
(``pipeline/webhooks.py``, built on a worker) both strip the same fields with this one list, so
a field added to ``JobResult`` that names a server path is hidden from both or from neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RESULT_EXCLUDED", "public_result"]

# Where the server keeps the file (paths, a file:// or s3:// URI) is not the caller's business:
# the audio has its own URL (and a pre-signed download_url with object storage).
RESULT_EXCLUDED = frozenset({"output_path", "sidecar_path", "uri"})


def public_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """``result`` (a ``JobResult`` as JSON) without the fields of ``RESULT_EXCLUDED``."""
    return {key: value for key, value in result.items() if key not in RESULT_EXCLUDED}


def job_path(job_id: str, tail: str = "") -> str:
    """The gateway's path of a job (``tail``: ``/audio``, ``/partial``, ``/events``)."""
    return f"/v1/jobs/{job_id}{tail}"


def public_link(public_url: str | None, path: str) -> str:
    """``path`` on the gateway as a caller outside it reaches it: absolute under ``api.public_url``
    (no trailing slash, the schema's pattern), else the path alone."""
    return path if public_url is None else public_url + path
