"""Pipeline stages, one module each (plain functions: store + sequence id in, stage output in the store),
and ``stage_tasks``: their thin Prefect task wrappers. Only ``stage_tasks`` imports Prefect."""
