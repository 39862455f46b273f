"""Prefect tasks: the stage bodies of tasks/stage_runs.py as tasks. They pass params dicts and paths,
never tensors; no result caching (each stage resumes its own work from disk instead)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import stage_runs as s

download = task(s.download, name="download", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
make_data = task(s.make_data, name="make_data", cache_policy=NO_CACHE)
prepare_diffs = task(s.prepare_diffs, name="prepare_diffs", cache_policy=NO_CACHE)
train_shard = task(s.train_shard, name="train_shard", task_run_name="train_shard-{behavior}-{index}", cache_policy=NO_CACHE)
assemble = task(s.assemble, name="assemble", cache_policy=NO_CACHE)
train_interpreter = task(s.train_interpreter, name="train_interpreter", cache_policy=NO_CACHE)
evaluate = task(s.evaluate, name="evaluate", cache_policy=NO_CACHE)
scaling = task(s.scaling, name="scaling", cache_policy=NO_CACHE)
cross_behavior = task(s.cross_behavior, name="cross_behavior", cache_policy=NO_CACHE)
transfer = task(s.transfer, name="transfer", cache_policy=NO_CACHE)
retrain_data = task(s.retrain_data, name="retrain_data", cache_policy=NO_CACHE)
retrain_assemble = task(s.retrain_assemble, name="retrain_assemble", cache_policy=NO_CACHE)
retrain_interpreter = task(s.retrain_interpreter, name="retrain_interpreter", cache_policy=NO_CACHE)
retrain_evaluate = task(s.retrain_evaluate, name="retrain_evaluate", cache_policy=NO_CACHE)
retrain_finish = task(s.retrain_finish, name="retrain_finish", cache_policy=NO_CACHE)
