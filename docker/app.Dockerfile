# syntax=docker/dockerfile:1
# The CPU-side image: Flower, beat, and calling services (producers). No torch.
# Build from the repository root:
#   docker build -f docker/app.Dockerfile -t musicgen-app .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ffmpeg: producers probe melody files before they enqueue them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/musicgen
COPY pyproject.toml README.md requirements.lock ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY settings ./settings
# The versions CI tested: requirements.lock constrains every package (see .ci/lock).
RUN pip install "uv==0.13.9" \
 && uv pip install --system --constraint requirements.lock ".[flower,postgres,api,storage]"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin musicgen \
 && mkdir -p /data \
 && chown musicgen:musicgen /data /srv/musicgen
USER musicgen

EXPOSE 5555
# compose.yaml picks the process per service: `musicgen-pipeline flower` or `musicgen-pipeline beat`.
CMD ["musicgen-pipeline", "flower"]
