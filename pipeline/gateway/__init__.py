"""The HTTP gateway: a thin ASGI layer (FastAPI) over the producer, for callers that are not
Python services. ``pipeline.gateway.app.create_app(settings)`` builds it and
``musicgen-pipeline api`` serves it; it owns no logic of its own.

This ``__init__`` imports nothing on purpose: the key store (``keystore``) serves the
``keys`` command without the ``api`` extra installed, and ``import pipeline`` never reaches
FastAPI.
"""
