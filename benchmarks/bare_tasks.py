"""The baseline for benchmarks/job_overhead.py: a bare Celery task over the same Redis, with the
same delivery settings as the pipeline (JSON, late acks, prefetch 1) and nothing else."""

import os

from celery import Celery

app = Celery("bare", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue="bare",
                broker_connection_retry_on_startup=True)


@app.task(name="bare.echo")
def echo(payload: dict) -> dict:  # type: ignore[type-arg]
    return payload
