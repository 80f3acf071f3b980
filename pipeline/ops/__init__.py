"""Operations: usage statistics, experiments, the monitoring Celery app (beat's maintenance tasks,
``inspect``) and the queue exporter.

Built on the infrastructure; the client reads experiments from here, never the other way round
(``tests/pipeline/test_layering.py``).
"""
