"""Prefect orchestration over the DVC stages.

Not built yet: the pipeline runs with `dvc repro` today. The flows (pipeline flow, GPU work
pool, scheduled deployments) will live here and only order and route the stages in `tasks/`.
"""
