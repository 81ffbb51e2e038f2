"""Celery tasks: thin glue that takes a job id and hands it to its job module."""

from __future__ import annotations

import uuid

import httpx

from core.queue import EVALUATE_TASK, INGEST_TASK, SHARD_TASK, TRAIN_TASK, WEBHOOK_TASK
from core.settings import get_settings
from workers import evaluation_jobs, ingest, shard_jobs, training_jobs, webhooks
from workers.celery_app import app
from workers.runtime import runtime


# The job's time limit is enforced by the supervisor killing the engine child; Celery's soft
# limit (prefork pool only) is a backstop a minute later.
@app.task(name=EVALUATE_TASK, acks_late=True, reject_on_worker_lost=True,
          soft_time_limit=get_settings().job_time_limit + 60)
def evaluate(evaluation_id: str) -> str:
    return evaluation_jobs.run(runtime(), uuid.UUID(evaluation_id), send_task=app.send_task)


@app.task(name=SHARD_TASK, acks_late=True, reject_on_worker_lost=True,
          soft_time_limit=get_settings().job_time_limit + 60)
def evaluate_shard(shard_id: str) -> str:
    return shard_jobs.run(runtime(), uuid.UUID(shard_id), send_task=app.send_task)


@app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True,
          soft_time_limit=get_settings().job_time_limit + 60)
def train(training_id: str) -> str:
    return training_jobs.run(runtime(), uuid.UUID(training_id), send_task=app.send_task)


@app.task(name=WEBHOOK_TASK, acks_late=True, autoretry_for=(httpx.HTTPError,),
          retry_backoff=5, retry_backoff_max=600, retry_jitter=True, max_retries=8)
def deliver_webhook(evaluation_id: str) -> int | None:
    return webhooks.deliver(runtime(), evaluation_id)


@app.task(name=INGEST_TASK, acks_late=True, reject_on_worker_lost=True,
          soft_time_limit=get_settings().job_time_limit + 60)
def ingest_dataset(ingest_id: str) -> str:
    return ingest.run(runtime(), uuid.UUID(ingest_id))
