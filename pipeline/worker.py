"""The worker entry point: the Celery app with every task registered.

    celery -A pipeline.worker worker -Q coordinator      # the loop (pipeline/stages.py)
    celery -A pipeline.worker worker -Q trainer          # LM training and generation
    celery -A pipeline.worker worker -Q sandbox          # candidate evaluations

The app and its configuration: pipeline/celery_app.py. The tasks: pipeline/sandbox_task.py
(`run_job`) and pipeline/stages.py (the coordinator's stages). Nothing imports this
module; it only imports the others.
"""
from __future__ import annotations

from pipeline import sandbox_task, stages  # noqa: F401  (register the tasks on the app)
from pipeline.celery_app import app

__all__ = ["app"]
