"""The job contract: what a caller and a worker agree on.

The request and result models (``jobs``), the output formats, the time limits a job runs under,
the URLs a job may carry, who a request is for (``user_context``) and the per-user feature flags
that the settings schema types. The floor of the package, beside ``pipeline.errors`` and
``pipeline.config``: nothing here imports the client, the workers, the infrastructure or the
operations (``tests/pipeline/test_layering.py``).
"""
