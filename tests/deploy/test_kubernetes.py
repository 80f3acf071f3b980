"""deploy/kubernetes: each overlay builds with kustomize (kubectl's), every built-in object is
valid against the Kubernetes schemas (kubernetes-validate, offline), a worker is never killed
mid-job, and KEDA scales each worker queue from zero without ever dropping a busy worker."""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipeline.config import load_settings
from pipeline.config.layers import available
from pipeline.contract.time_limits import job_time_limits

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
PROMETHEUS = REPO / "deploy" / "prometheus"
OVERLAYS = ["redis", "rabbitmq"]
K8S_VERSION = "1.30.0"
JOBS_PER_WORKER = 4  # the rule's divisor: generation.max_batch_size
# What production's settings need to load: placeholders for the variables its layer reads.
PRODUCTION_ENV = {"MUSICGEN_ENV": "production", "REDIS_URL": "redis://redis:6379/0",
                  "REDIS_PASSWORD": "kX3v9LmQ2pR7sT4wZ8yB", "DATABASE_URL": "postgresql://db/x",
                  "FLOWER_PASSWORD": "aK3v9LmQ2pR7sT4wZ8yB"}


@cache
def built(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is installed by .ci/install"
    out = subprocess.run([kubectl, "kustomize", str(KUBE / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in built(overlay) if d["kind"] == kind]


def workers(overlay: str) -> list[dict[str, Any]]:
    return [d for d in of_kind(overlay, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_builtin_object_is_valid(overlay: str) -> None:
    kinds = set()
    for doc in built(overlay):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema offline; its fields are checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job",
            "StatefulSet", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_beat_and_one_gpu_worker_per_preset(overlay: str) -> None:
    beat = next(d for d in of_kind(overlay, "Deployment") if d["metadata"]["name"] == "beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    presets = set(available("models"))
    for worker in workers(overlay):
        container = worker["spec"]["template"]["spec"]["containers"][0]
        preset = env_of(container)["MUSICGEN_MODEL__PRESET"]
        assert preset in presets
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert f"musicgen.{preset}" in container["command"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_a_worker_is_never_killed_mid_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grace outlasts the longest job a worker can be running when SIGTERM comes, under
    production's settings with the Deployment's own overrides, in every deployment profile."""
    for worker in workers("redis"):
        spec = worker["spec"]["template"]["spec"]
        env = {**PRODUCTION_ENV, **env_of(spec["containers"][0])}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for profile in [None, *available("profiles")]:
            settings = load_settings(overrides={"app.profile": profile} if profile else {})
            w = settings.worker
            longest = job_time_limits(w, float("inf"))  # a job at the cap
            # The worker waits out a running job for shutdown_grace: every job has ended (done,
            # or failed at its own soft limit) by then.
            assert w.shutdown_grace >= longest.soft, (profile, w.shutdown_grace, longest)
            assert spec["terminationGracePeriodSeconds"] > longest.hard + w.shutdown_grace, profile


# --- the scaler ------------------------------------------------------------------------------
# A recorded day in minutes, compressed: jobs arriving per minute on one queue (a burst, a lull,
# a trickle, a second burst, quiet).
ARRIVALS = [0, 3, 9, 2, 0, 0, 1, 0, 0, 0, 0, 0, 5, 14, 6, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0]
# Minutes each job runs, in turn: short clips and long-form ones, several longer than the
# scale-down window (so the window alone would not keep a busy worker).
JOB_MINUTES = [2, 9, 4, 12, 1, 7]
COOLDOWN = 5  # minutes: KEDA's cooldownPeriod and the HPA's scale-down window (300 s)
MAX_REPLICAS = 8


def workers_wanted(depth: int, in_flight: int, live: int) -> int:
    """musicgen:queue_workers_wanted (deploy/prometheus/rules.yaml), as the test models it."""
    need = math.ceil((depth + in_flight) / JOBS_PER_WORKER)
    return max(need, live) if in_flight > 0 else need


@dataclass
class Pod:
    name: str
    ready: bool = False
    jobs: list[int] = field(default_factory=list)  # minutes left of each held job


def simulate() -> list[tuple[int, int, dict[str, bool], int]]:
    """KEDA + the HPA over ARRIVALS; per minute (depth, in flight, pod -> ready, wanted).

    A scale-down deletes unready pods first (the ReplicaSet controller's order) and then the
    busiest ready pod: the worst pick. The test fails if that pod holds a job.
    """
    waiting, pods, serial, recs, idle_for, started = 0, [], 0, [], 0, 0
    record = []
    for arrived in ARRIVALS:
        waiting += arrived
        for pod in pods:  # a job takes a minute step; pods that started last minute are ready
            pod.jobs = [m - 1 for m in pod.jobs if m > 1]
            pod.ready = True
        for pod in pods:
            take = min(waiting, JOBS_PER_WORKER - len(pod.jobs))
            pod.jobs += [JOB_MINUTES[(started + i) % len(JOB_MINUTES)] for i in range(take)]
            waiting -= take
            started += take
        in_flight = sum(len(p.jobs) for p in pods)
        live = sum(p.ready for p in pods)
        wanted = workers_wanted(waiting, in_flight, live)
        record.append((waiting, in_flight, {p.name: p.ready for p in pods}, wanted))
        idle_for = idle_for + 1 if wanted == 0 else 0  # activation: wanted > 0, i.e. 1 job
        recs = (recs + [wanted])[-COOLDOWN:]
        desired = 0 if idle_for >= COOLDOWN else min(MAX_REPLICAS, max(recs))
        if wanted > 0:
            desired = max(desired, 1)
        while len(pods) < desired:
            serial += 1
            pods.append(Pod(f"w{serial}"))
        while len(pods) > desired:
            pods.sort(key=lambda p: (p.ready, len(p.jobs)))
            gone = pods.pop()
            assert not gone.jobs, f"scaled down {gone.name} holding {len(gone.jobs)} jobs"
    assert waiting == 0 and not pods, "the queue drained and the workers went back to zero"
    return record


def test_replicas_never_drop_while_a_worker_holds_a_job() -> None:
    record = simulate()
    assert max(r[3] for r in record) > 1  # the bursts did scale out


def test_the_prometheus_rule_is_the_formula_the_simulation_ran(tmp_path: Path) -> None:
    """promtool evaluates the real recording rule on the simulated series, minute by minute."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus) is installed by .ci/install"
    record = simulate()
    names = sorted({n for _, _, pods, _ in record for n in pods}, key=lambda n: int(n[1:]))

    def ready(name: str, pods: dict[str, bool]) -> str:
        return "1" if pods.get(name) else ("stale" if any(name in r[2] for r in record) else "_")

    series = [{"series": 'musicgen_queue_depth{queue="musicgen.q"}',
               "values": " ".join(str(r[0]) for r in record)},
              {"series": 'musicgen_jobs_in_flight{queue="musicgen.q"}',
               "values": " ".join(str(r[1]) for r in record)}]
    series += [{"series": f'musicgen_worker_ready{{model="q", instance="{n}", pid="1"}}',
                "values": " ".join(ready(n, r[2]) for r in record)} for n in names]
    checks = [{"expr": "musicgen:queue_workers_wanted", "eval_time": f"{minute}m",
               "exp_samples": [{"labels": 'musicgen:queue_workers_wanted{queue="musicgen.q"}',
                                "value": wanted}]}
              for minute, (_, _, _, wanted) in enumerate(record)]
    test = {"rule_files": [str(PROMETHEUS / "rules.yaml")], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": checks}]}
    path = tmp_path / "scaler_test.yaml"
    path.write_text(yaml.safe_dump(test))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_each_worker_queue_from_zero_at_one_job(overlay: str) -> None:
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(overlay, "ScaledObject")}
    assert set(scaled) == {w["metadata"]["name"] for w in workers(overlay)}
    for worker in workers(overlay):
        assert worker["spec"]["replicas"] == 0  # KEDA owns the count
        spec = scaled[worker["metadata"]["name"]]["spec"]
        assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] == COOLDOWN * 60
        (trigger,) = spec["triggers"]
        queue = f"musicgen.{env_of(worker['spec']['template']['spec']['containers'][0])['MUSICGEN_MODEL__PRESET']}"
        meta = trigger["metadata"]
        if trigger["type"] == "prometheus":
            # wanted >= 1 as soon as one job waits, so active above 0
            assert meta["query"] == f'musicgen:queue_workers_wanted{{queue="{queue}"}}'
            assert (meta["threshold"], meta["activationThreshold"]) == ("1", "0")
        else:
            assert trigger["type"] == "rabbitmq" and meta["queueName"] == queue
            assert meta["mode"] == "QueueLength" and meta["activationValue"] == "0"
            assert meta["value"] == str(JOBS_PER_WORKER)
