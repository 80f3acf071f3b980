"""Partial results of long jobs: the audio generated so far, published after each window.

The engine's loop only leaves a job's codes so far on its ticket (``PartialCodes``, no decode,
no I/O: the loop goes straight on to the next window); the job's own task thread decodes them,
renders them in the job's format and stores the file through the job's storage backend under
one name per job, ``<job_id>.partial<ext>``, replaced atomically by each newer partial. Each is a
complete file a caller can start playing. The final file is written as before (atomically, its
own name) and is the only one that counts: the partial is removed when the job ends, whatever
the outcome.

Publishing is best-effort: a partial that cannot be rendered or stored is logged and skipped,
never a reason to fail the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.contract.jobs import JobSpec
from pipeline.infra.storage_backends import StorageBackend

log = logging.getLogger(__name__)

PartialSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class PartialCodes:
    """A long job's codes so far, ``(codebooks, frames)``, after window ``window`` of ``windows``."""

    codes: Any  # a torch.Tensor: this module is imported where torch may not be
    window: int
    windows: int


def partial_name(job_id: str, extension: str) -> str:
    """The one name a job's partial file has (every newer partial replaces it)."""
    return f"{job_id}.partial{extension}"


class PartialPublisher:
    """Publishes one job's partials; ``remove`` takes the last one away at the job's end."""

    def __init__(self, spec: JobSpec, loaded: Any, out_dir: Path, temp_dir: Path,
                 backend: StorageBackend, sink: PartialSink | None, skip: int = 0) -> None:
        self._spec, self._loaded, self._backend, self._sink = spec, loaded, backend, sink
        # Samples at the start that are not the job's output: a continuation's clip when the
        # output leaves it out (the codes so far start with the clip's).
        self._skip = skip
        self._temp_dir = temp_dir
        self._dest = out_dir / partial_name(spec.job_id, spec.output.info.extension)
        self._stored = False
        self.last: PartialCodes | None = None

    def publish(self, partial: PartialCodes) -> None:
        """Decode, render and store ``partial``, then tell the sink where it is (best-effort)."""
        self.last = partial
        try:
            info = self._publish(partial)
        except Exception:  # noqa: BLE001 - a partial is a courtesy; the job goes on
            log.warning("could not publish window %d of job %s", partial.window,
                        self._spec.job_id, exc_info=True)
            return
        if self._sink is not None:
            self._sink(info)

    def _publish(self, partial: PartialCodes) -> dict[str, Any]:
        import torch

        from workers.audio.postprocess import render
        from workers.runtime.longform import decode_codes

        loaded = self._loaded
        with torch.inference_mode():
            audio = decode_codes(loaded.model, partial.codes[None].to(loaded.device))
        samples = audio[0].to(torch.float32).cpu().numpy()[:, self._skip:]
        seconds = min(samples.shape[-1] / loaded.sampling_rate, self._spec.duration)
        samples = samples[:, :round(seconds * loaded.sampling_rate)]
        rendered = render(samples, loaded.sampling_rate, self._spec.output, self._dest,
                          temp_dir=self._temp_dir)
        local = self._backend.local_root is not None
        uri = rendered.path.as_uri() if local else self._backend.put_file(rendered.path,
                                                                          self._dest.name)
        self._stored = True
        return {"uri": uri, "path": str(rendered.path) if local else None,
                "seconds": round(rendered.duration_s, 3), "window": partial.window,
                "windows": partial.windows, "format": rendered.format,
                "published_at": time.time()}

    def remove(self) -> None:
        """Take the job's partial away (the final file, or nothing, is what remains)."""
        self._dest.unlink(missing_ok=True)
        if self._stored and self._backend.local_root is None:
            try:
                self._backend.delete([self._dest.name])
            except Exception:  # noqa: BLE001 - the retention sweep is the backstop
                log.warning("could not remove the partial of job %s", self._spec.job_id,
                            exc_info=True)
