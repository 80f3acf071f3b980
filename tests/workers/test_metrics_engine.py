"""``observe_engine``: the ``musicgen_engine{model,engine}`` gauge as the worker's server reads
it (multiprocess mode, a fresh process per scenario: see test_metrics_batch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from workers import metrics

from .test_metrics_batch import REPO_ROOT, _scrape, folder  # noqa: F401 (the fixture)

# Records each "model=engine" argument in order, as a worker's verdicts come.
_OBSERVE = """
import sys
from workers.metrics import observe_engine
for pair in sys.argv[1:]:
    observe_engine(*pair.split("="))
"""


def _observe(folder: Path, *pairs: str) -> None:  # noqa: F811 (the fixture's name)
    env = {**os.environ, metrics.MULTIPROC_ENV: str(folder)}
    proc = subprocess.run([sys.executable, "-c", _OBSERVE, *pairs], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_gauge_is_one_for_the_serving_engine_and_zero_for_the_other(
        folder: Path) -> None:  # noqa: F811 (the imported fixture)
    _observe(folder, "tiny=static", "musicgen-small=hf")
    engines = {(dict(labels)["model"], dict(labels)["engine"]): value
               for (name, labels), value in _scrape(folder).items()
               if name == "musicgen_engine"}
    assert engines == {("tiny", "static"): 1.0, ("tiny", "hf"): 0.0,
                       ("musicgen-small", "static"): 0.0, ("musicgen-small", "hf"): 1.0}
