"""The generate_diffs stage: train every diff of a behaviour dataset, shard by shard, resumably."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import polars as pl

from dit_core.behaviors import behavior_of
from dit_core.config import Params
from dit_core.diffs.full import train_full_diffs
from dit_core.diffs.peft_made import peft_scale, train_peft_diffs
from dit_core.diffs.store import DiffShard, DiffStore
from dit_core.diffs.trainer import train_diffs
from dit_core.io import compare_record, write_json_atomic
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import LoadedModel, compute_context

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
# Behaviour-check columns of the manifest (a behaviour's check fills those that apply to it).
CHECK_COLUMNS = ("trigger_hit", "wrong_prefix_hit", "no_trigger_hit", "check_kl", "fact_acc", "base_fact_acc")


def _run_identity(p: Params, lm: LoadedModel, behavior_dir: Path) -> dict:
    """What must match for a rerun to resume instead of starting over."""
    cfg = behavior_of(behavior_dir).diffs_config(p)
    # Left out: what changes how many diffs are made or how a step is split into micro-batches (the
    # same gradient), not the diffs themselves, so finished shards stay valid when these change; and the
    # settings of the other modes (stores made before a mode existed stay valid; a LoRA store records no mode).
    exclude = {"check", "budget_s", "max_batch_tokens"}
    if cfg.ranks is None:  # one rank for every shard: stores made before diffs.ranks existed stay valid
        exclude |= {"ranks"}
    for mode, keys in MODE_ONLY.items():
        if mode != cfg.mode:
            exclude |= keys
    if cfg.mode == "lora":
        exclude |= {"mode"}
    return {
        "base_model": lm.name, "base_sha256": lm.sha256, "behavior_dir": str(behavior_dir),
        "diffs": cfg.model_dump(exclude=exclude),
    }


# diffs keys only one diffs.mode reads
MODE_ONLY = {"full": {"full_rank", "full_lr", "full_diffs_at_once"},
             "peft": {"peft_rank", "peft_alpha", "peft_rslora", "peft_target_modules", "peft_lr"}}


def _recorded_mode(run_file: Path) -> str | None:
    """diffs.mode of a store's run record (records made before the mode existed: lora)."""
    try:
        return json.loads(run_file.read_text()).get("diffs", {}).get("mode", "lora")
    except (OSError, ValueError, AttributeError):
        return None


def stored_rank_scale(cfg) -> tuple[int, float]:
    """Rank and scale of the stored diffs: LoRA rank and alpha/rank, full_rank at scale 1 (full mode), or
    the PEFT adapters' r and peft scale (peft mode)."""
    if cfg.mode == "full":
        return cfg.full_rank, 1.0
    if cfg.mode == "peft":
        return cfg.peft_rank, peft_scale(cfg)
    return cfg.rank, cfg.scale


def plan_shards(specs: pl.DataFrame, per_shard: int) -> list[list[str]]:
    """Diff ids grouped into shards of `per_shard` in manifest order."""
    ids = specs["diff_id"].to_list()
    return [ids[i : i + per_shard] for i in range(0, len(ids), per_shard)]


def prepare_run(p: Params, lm: LoadedModel, behavior_dir: str | Path, out_dir: str | Path) -> int:
    """Check (or record) the run's identity; returns the number of shards to train."""
    behavior_dir, out_dir = Path(behavior_dir), Path(out_dir)
    behavior = behavior_of(behavior_dir)
    specs = behavior.specs(behavior_dir)
    identity = _run_identity(p, lm, behavior_dir)
    run_file = out_dir / RUN_FILE
    changed = compare_record(run_file, identity)
    if changed is not None:
        if _recorded_mode(run_file) != behavior.diffs_config(p).mode and "diffs.mode" not in changed:
            changed = [*changed, "diffs.mode"]  # a LoRA identity leaves the mode out: compare it here
        if changed:
            raise RuntimeError(
                f"{out_dir} holds diffs made with other settings ({', '.join(changed)} differ). "
                f"Refusing to mix or overwrite them: delete {out_dir} or choose --set diffs.run=<new name>.")
    else:
        write_json_atomic(run_file, identity)
    return len(plan_shards(specs, behavior.diffs_config(p).diffs_per_batch))


def train_shard(p: Params, lm: LoadedModel, behavior_dir: str | Path, out_dir: str | Path, index: int,
                dm: DiffModel | None = None, timings: dict | None = None) -> str:
    """Train and store shard `index` unless it is already complete; returns 'trained' or 'skipped'.

    `timings`, if given, receives the seconds spent preparing, training, checking and writing.
    """
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    behavior_dir = Path(behavior_dir)
    behavior = behavior_of(behavior_dir)
    cfg = behavior.diffs_config(p).for_shard(index)  # diffs.ranks: this shard's rank
    specs = behavior.specs(behavior_dir)
    store = DiffStore(out_dir)
    ids = plan_shards(specs, cfg.diffs_per_batch)[index]
    if store.is_complete(index, ids):
        log.info("shard %d already complete, skipping", index)
        return "skipped"
    dm = dm or DiffModel(lm.model, cfg.modules)
    tasks, checks = behavior.tasks(p, lm.tokenizer, behavior_dir, specs, ids)
    t1 = time.perf_counter()
    rank, scale = stored_rank_scale(cfg)
    with compute_context(lm.device, p.model.autocast, p.model.fp32_linear):
        if cfg.mode == "full":  # dense deltas, reduced to the stored factors before the check
            result = train_full_diffs(dm, tasks, cfg, lm.tokenizer.pad_token_id)
        elif cfg.mode == "peft":  # one PEFT adapter per diff, saved and imported as a user's
            result = train_peft_diffs(dm, tasks, cfg, lm.tokenizer.pad_token_id, lm.name, lm.sha256)
        else:
            result = train_diffs(dm, tasks, cfg, lm.tokenizer.pad_token_id)  # ends reading its losses
        t2 = time.perf_counter()
        metrics = (behavior.check(p, dm, lm.tokenizer, checks, result.A, result.B, scale)
                   if cfg.check else [{}] * len(ids))
    t3 = time.perf_counter()
    spec_rows = {r["diff_id"]: r for r in specs.iter_rows(named=True)}
    rows = []
    for row, (task, m) in enumerate(zip(tasks, metrics)):
        s = spec_rows[task.diff_id]
        rows.append(dict(
            diff_id=task.diff_id, row=row, behavior=behavior.name, **behavior.manifest_fields(s),
            rank=rank, scale=scale, base_model=lm.name, base_sha256=lm.sha256,
            train_loss=result.final["loss"][row], trigger_ce=result.final["ce"][row],
            kl=result.final["kl"][row], split="none",
            kept_share=result.kept_share[row] if result.kept_share else None,
            **{k: m.get(k) for k in CHECK_COLUMNS}))
    shard = DiffShard(result.A, result.B, lm.name, lm.sha256, rank, scale, [t.diff_id for t in tasks])
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
    cfg = behavior_of(behavior_dir).diffs_config(p)
    dm = dm or DiffModel(lm.model, cfg.modules)  # wrapped once, reused for every shard
    t0 = time.time()
    status, stopped = run_shards(n, lambda i: train_shard(p, lm, behavior_dir, out_dir, i, dm), cfg.budget_s)
    return finalize_run(out_dir, n, run_stats(status, time.time() - t0, cfg.diffs_per_batch, stopped))


def summarize(manifest: pl.DataFrame) -> dict:
    """Median behaviour-check numbers over the diffs of a manifest."""
    out = {"n_diffs": manifest.height}
    for col in ("trigger_hit", "wrong_prefix_hit", "no_trigger_hit", "check_kl", "fact_acc", "base_fact_acc",
                "train_loss", "kept_share"):
        vals = manifest[col].drop_nulls()
        if col in ("fact_acc", "base_fact_acc", "kept_share") and not len(vals):
            continue  # a hidden-topic store: its summary keeps the keys it always had
        out[f"median_{col}"] = float(vals.median()) if len(vals) else None
        out[f"mean_{col}"] = float(vals.mean()) if len(vals) else None
    return out
