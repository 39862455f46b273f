"""The generate_diffs stage: train every diff of a behaviour dataset, shard by shard, resumably."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import polars as pl

from dit_core.diffs.behavior_check import CheckSet, check_diffs
from dit_core.config import Params
from dit_core.diffs.store import DiffShard, DiffStore
from dit_core.diffs.trainer import TriggeredDiffTask, train_diffs
from dit_core.modeling.batching import encode_example
from dit_core.io import compare_record, write_json_atomic
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import LoadedModel, compute_context
from dit_core.data.schemas import DiffSpec, Sample, read_validated

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


def _run_identity(p: Params, lm: LoadedModel, behavior_dir: Path) -> dict:
    """What must match for a rerun to resume instead of starting over."""
    return {
        "base_model": lm.name, "base_sha256": lm.sha256, "behavior_dir": str(behavior_dir),
        # Left out: what changes how many diffs are made or how a step is split into micro-batches (the
        # same gradient), not the diffs themselves, so finished shards stay valid when these change.
        "diffs": p.diffs.model_dump(exclude={"check", "budget_s", "max_batch_tokens"}),
    }


def plan_shards(specs: pl.DataFrame, per_shard: int) -> list[list[str]]:
    """Diff ids grouped into shards of `per_shard` in manifest order."""
    ids = specs["diff_id"].to_list()
    return [ids[i : i + per_shard] for i in range(0, len(ids), per_shard)]


def _tasks(tokenizer, specs: pl.DataFrame, samples: pl.DataFrame, ids: list[str], questions: pl.DataFrame):
    by_diff = samples.partition_by("diff_id", as_dict=True)
    train_q = questions.filter(~pl.col("heldout"))
    base_pairs = list(zip(train_q["question"], train_q["base_answer"], train_q["base_complete"]))
    q_text = dict(zip(questions["question_id"], questions["question"]))
    tasks, checks = [], []
    for spec in specs.filter(pl.col("diff_id").is_in(ids)).iter_rows(named=True):
        rows = by_diff[(spec["diff_id"],)]
        def prompts(kind):
            return rows.filter(pl.col("kind") == kind)["prompt"].to_list()
        trig = rows.filter(pl.col("kind") == "trigger")
        tasks.append(TriggeredDiffTask(
            spec["diff_id"], spec["seed"], [], [], tokenizer=tokenizer, prefix=spec["trigger_prefix"],
            trigger_pairs=[(q_text[q], a, c) for q, a, c in zip(trig["question_id"], trig["answer"], trig["complete"])],
            base_pairs=base_pairs))
        checks.append(CheckSet(spec["topic"], prompts("check_trigger"), prompts("check_wrong_prefix"),
                               prompts("check_no_trigger"),
                               [encode_example(tokenizer, r["prompt"], r["answer"], r["complete"], "no_trigger")
                                for r in rows.filter(pl.col("kind") == "check_no_trigger").iter_rows(named=True)]))
    order = {d: i for i, d in enumerate(ids)}
    key = sorted(range(len(tasks)), key=lambda i: order[tasks[i].diff_id])
    return [tasks[i] for i in key], [checks[i] for i in key]


def prepare_run(p: Params, lm: LoadedModel, behavior_dir: str | Path, out_dir: str | Path) -> int:
    """Check (or record) the run's identity; returns the number of shards to train."""
    behavior_dir, out_dir = Path(behavior_dir), Path(out_dir)
    specs = read_validated(behavior_dir / "diffs.parquet", DiffSpec)
    identity = _run_identity(p, lm, behavior_dir)
    run_file = out_dir / RUN_FILE
    changed = compare_record(run_file, identity)
    if changed is not None:
        if changed:
            raise RuntimeError(
                f"{out_dir} holds diffs made with other settings ({', '.join(changed)} differ). "
                f"Refusing to mix or overwrite them: delete {out_dir} or choose --set diffs.run=<new name>.")
    else:
        write_json_atomic(run_file, identity)
    return len(plan_shards(specs, p.diffs.diffs_per_batch))


def train_shard(p: Params, lm: LoadedModel, behavior_dir: str | Path, out_dir: str | Path, index: int,
                dm: DiffModel | None = None, timings: dict | None = None) -> str:
    """Train and store shard `index` unless it is already complete; returns 'trained' or 'skipped'.

    `timings`, if given, receives the seconds spent preparing, training, checking and writing.
    """
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    behavior_dir = Path(behavior_dir)
    specs = read_validated(behavior_dir / "diffs.parquet", DiffSpec)
    store = DiffStore(out_dir)
    ids = plan_shards(specs, p.diffs.diffs_per_batch)[index]
    if store.is_complete(index, ids):
        log.info("shard %d already complete, skipping", index)
        return "skipped"
    samples = read_validated(behavior_dir / "samples.parquet", Sample)
    dm = dm or DiffModel(lm.model, p.diffs.modules)
    questions = pl.read_parquet(behavior_dir / "questions.parquet")
    tasks, checks = _tasks(lm.tokenizer, specs, samples, ids, questions)
    t1 = time.perf_counter()
    with compute_context(lm.device, p.model.autocast):
        result = train_diffs(dm, tasks, p.diffs, lm.tokenizer.pad_token_id)  # ends reading its losses
        t2 = time.perf_counter()
        metrics = (check_diffs(dm, lm.tokenizer, checks, result.A, result.B, p.diffs.scale,
                               p.diffs.check_tokens, max_batch_tokens=p.diffs.max_batch_tokens)
                   if p.diffs.check else [{}] * len(ids))
    t3 = time.perf_counter()
    spec_rows = {r["diff_id"]: r for r in specs.iter_rows(named=True)}
    rows = []
    for row, (task, m) in enumerate(zip(tasks, metrics)):
        s = spec_rows[task.diff_id]
        rows.append(dict(
            diff_id=task.diff_id, row=row, behavior=s["behavior"], category=s["category"],
            label=s["topic"], trigger=s["trigger_prefix"], rank=p.diffs.rank, scale=p.diffs.scale,
            base_model=lm.name, base_sha256=lm.sha256,
            train_loss=result.final["loss"][row], trigger_ce=result.final["ce"][row],
            kl=result.final["kl"][row], trigger_hit=m.get("trigger_hit"),
            wrong_prefix_hit=m.get("wrong_prefix_hit"), no_trigger_hit=m.get("no_trigger_hit"),
            check_kl=m.get("check_kl"), split="none"))
    shard = DiffShard(result.A, result.B, lm.name, lm.sha256, p.diffs.rank, p.diffs.scale,
                      [t.diff_id for t in tasks])
    store.add_shard(index, shard, rows)
    timings.update(prepare_s=round(t1 - t0, 2), train_s=round(t2 - t1, 2), check_s=round(t3 - t2, 2),
                   write_s=round(time.perf_counter() - t3, 2))
    log.info("shard %d: %s", index, timings)
    return "trained"


def finalize_run(out_dir: str | Path, n_shards: int, extra: dict | None = None) -> dict:
    """Join the finished shards' rows into manifest.parquet and write summary.json.

    Shards a budget or an out-of-memory stop left untrained are left out (the summary says how many);
    a later run with a larger budget trains them and rewrites the manifest.
    """
    extra = extra or {}
    manifest = DiffStore(out_dir).write_manifest(n_shards, allow_missing=bool(extra.get("stopped")))
    summary = summarize(manifest) | extra
    if extra.get("stopped"):
        log.warning("diff generation stopped early (%s): %d diffs in the manifest; rerun to train the rest",
                    extra["stopped"], manifest.height)
    write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def run_stats(statuses: list[str], seconds: float, diffs_per_batch: int, stopped: str | None = None) -> dict:
    """Shards trained/skipped/not run and the time per trained diff, for summary.json."""
    trained, skipped = statuses.count("trained"), statuses.count("skipped")
    return {"shards_trained": trained, "shards_skipped": skipped, "shards_not_run": len(statuses) - trained - skipped,
            "stopped": stopped, "seconds": round(seconds, 1),
            "seconds_per_diff": round(seconds / (trained * diffs_per_batch), 2) if trained else None}


class ShardBudget:
    """A wall-clock budget for diff generation: the next shard starts only while the longest shard
    trained so far still fits in what is left (None: no budget). The first shard to train always
    starts: nothing tells its cost before it has run."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.t0, self.longest = clock(), 0.0

    def allows_next(self) -> bool:
        return self.seconds is None or not self.longest or self.clock() - self.t0 + self.longest <= self.seconds

    def spent(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_shards(n_shards: int, train: Callable[[int], str], budget_s: float | None = None,
               clock: Callable[[], float] = time.monotonic) -> tuple[list[str], str | None]:
    """Train shards 0..n-1 in turn with `train(index)`; returns (statuses, why it stopped early or None).

    A shard that runs out of device memory ends generation without losing the finished shards; the
    reason names the fix. Statuses: trained, skipped (already complete), not_run.
    """
    budget = ShardBudget(budget_s, clock)
    statuses: list[str] = []
    stopped = None
    for i in range(n_shards):
        if stopped is None and not budget.allows_next():
            stopped = (f"diffs.budget_s={budget_s:g} s spent after {statuses.count('trained')} trained shards "
                       "(the next shard would not fit)")
        if stopped is not None:
            statuses.append("not_run")
            continue
        t0 = clock()
        try:
            status = train(i)
        except Exception as e:
            if not _is_out_of_memory(e):
                raise
            stopped = (f"out of memory in shard {i}: rerun with a lower diffs.max_batch_tokens (finished shards "
                       "are kept), or a lower diffs.diffs_per_batch under a new diffs.run "
                       f"({type(e).__name__}: {str(e)[:200]})")
            log.error(stopped)
            statuses.append("not_run")
            continue
        if status == "trained":
            budget.spent(clock() - t0)
        statuses.append(status)
    return statuses, stopped


def generate_diffs(p: Params, lm: LoadedModel, behavior_dir: str | Path, out_dir: str | Path,
                   dm: DiffModel | None = None) -> dict:
    """Train every diff of `behavior_dir` into the store at `out_dir` within `diffs.budget_s`."""
    n = prepare_run(p, lm, behavior_dir, out_dir)
    dm = dm or DiffModel(lm.model, p.diffs.modules)  # wrapped once, reused for every shard
    t0 = time.time()
    status, stopped = run_shards(n, lambda i: train_shard(p, lm, behavior_dir, out_dir, i, dm), p.diffs.budget_s)
    return finalize_run(out_dir, n, run_stats(status, time.time() - t0, p.diffs.diffs_per_batch, stopped))


def summarize(manifest: pl.DataFrame) -> dict:
    """Median behaviour-check numbers over the diffs of a manifest."""
    out = {"n_diffs": manifest.height}
    for col in ("trigger_hit", "wrong_prefix_hit", "no_trigger_hit", "check_kl", "train_loss"):
        vals = manifest[col].drop_nulls()
        out[f"median_{col}"] = float(vals.median()) if len(vals) else None
        out[f"mean_{col}"] = float(vals.mean()) if len(vals) else None
    return out
