# syntax=docker/dockerfile:1
# A MusicGen GPU worker: CUDA runtime, Python 3.11, ffmpeg, torch, then the project's worker extra.
# One container serves one GPU (see compose.yaml). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t musicgen-worker .
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# torch from PyPI is the CUDA build on Linux x86_64 and brings its own CUDA libraries; the host
# driver must support the CUDA version that build targets. To pin a specific CUDA build instead:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 22.04 ships Python 3.11 in universe (python3.11, python3.11-venv).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ffmpeg ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: the worker extra's range accepts it and pulls nothing more.
RUN pip install --upgrade pip \
 && pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /srv/musicgen
COPY pyproject.toml README.md requirements.lock ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY settings ./settings
# postgres: the worker writes the usage ledger to the same PostgreSQL as the producers.
# The versions CI tested: requirements.lock constrains every package but torch, which it leaves
# out (with its CUDA libraries) so that the build installed above is the one that stays.
RUN pip install "uv==0.13.9" \
 && uv pip install --python /opt/venv/bin/python --constraint requirements.lock ".[worker,postgres,storage]"

# Non-root. The model cache is a volume: weights are put there once (production runs with
# model.offline = true) and survive image rebuilds. HF_HOME points the Hugging Face cache at it.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin musicgen \
 && mkdir -p /models /data \
 && chown musicgen:musicgen /models /data /srv/musicgen
ENV HF_HOME=/models
VOLUME ["/models"]
USER musicgen

# Exec form: the worker is the container's main process and gets `docker stop`'s SIGTERM itself
# (`musicgen-pipeline worker` execs Celery; SIGTERM lets the running job finish for
# worker.shutdown_grace seconds, then requeues it).
CMD ["musicgen-pipeline", "worker"]
