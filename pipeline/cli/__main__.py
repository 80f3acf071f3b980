"""`python -m pipeline.cli` = the `musicgen-pipeline` console script."""

from pipeline.cli import main

main()
