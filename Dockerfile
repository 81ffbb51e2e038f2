# syntax=docker/dockerfile:1.7
# Two images from one lock file:
#   api    - FastAPI, SQLAlchemy, Celery client; no torch (small, starts fast)
#   worker - the same plus torch/torchvision (the registry wheels bundle CUDA; the host needs the
#            NVIDIA driver and container toolkit for `gpus`)
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir "uv>=0.4"
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./

FROM base AS api
RUN uv sync --frozen --no-dev --no-install-project
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN uv sync --frozen --no-dev
ENV PATH=/app/.venv/bin:$PATH ROBUSTSCOPE_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["robustscope", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# bubblewrap jails each uploaded model in a child process (docs/SECURITY.md).
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
RUN uv sync --frozen --no-dev --extra worker --no-install-project
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN uv sync --frozen --no-dev --extra worker
RUN useradd --system --uid 10001 --home-dir /data robustscope \
    && mkdir -p /data && chown robustscope /data
ENV PATH=/app/.venv/bin:$PATH ROBUSTSCOPE_DATA_DIR=/data
USER robustscope
CMD ["robustscope", "worker", "--queues", "evaluations,webhooks"]
