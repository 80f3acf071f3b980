"""The caller's client: the producer, the job handle, request resolution, the job registry, input
upload and the ledger's job records. ``pipeline`` re-exports its public names.

The top of the producer side: it may import every layer below it, and none of them imports it
(``tests/pipeline/test_layering.py``).
"""
