"""The infrastructure both sides stand on: the Celery app, the brokers and their Redis keys, the
result-change channel, storage backends, model files, ffmpeg and the audio probe, log format.

Imports the contract and the settings, never the client or the operations
(``tests/pipeline/test_layering.py``).
"""
