"""Scheduled retraining that learns: each round adds a diff store to the corpus, retrains the interpreter on
every round's diffs and scores it on a fixed benchmark split that never enters training.

    <retrain.dir>/<diffs.run>-benchmark/     made once (retrain.benchmark_seed): every round's test split
    <retrain.dir>/<diffs.run>-round-001/     one store per round, left untouched by later rounds
        behavior/     the store's own behaviour data (diffs, samples, questions): nothing overwrites it
        topics.csv    (rounds) the topic list minus the benchmark's topics, which rounds draw from
        retrain.json  what the store is made with; a resumed store must match it
        round.json    (rounds) written when the round has finished: the round's record
    <retrain.dir>/dataset/                   the latest round's dataset
    <paths.models>/retrain/round-001/interpreter/  <paths.reports>/retrain/round-001/

A run does round (highest finished round) + 1: a run that stopped resumes its round (behaviour data,
finished shards and interpreter checkpoints are kept) instead of starting another. The corpus is kept
out of paths.data: dvc.yaml owns data/diffs as a stage output (`dvc repro` deletes it before the stage
runs) and git ignores data/, where DVC refuses to write .dvc files. Rounds make hidden-topic diffs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
from pathlib import Path

import polars as pl

from dit_core.config import ConfigError, Params
from dit_core.io import atomic_path, compare_record, write_json_atomic

log = logging.getLogger(__name__)

RETRAIN_DIR = "retrain"
IDENTITY = "retrain.json"
ROUND_DONE = "round.json"
BENCHMARK_PREFIX = "bench-ht"
BEHAVIOR_DIR = "behavior"
BEHAVIOR = "hidden_topic"  # rounds make hidden-topic diffs (its topic list is what the benchmark holds out)


def retrain_root(p: Params) -> Path:
    return Path(p.retrain.dir)


def benchmark_store(p: Params) -> Path:
    return retrain_root(p) / f"{p.diffs.run}-benchmark"


def round_store(p: Params, n: int) -> Path:
    return retrain_root(p) / f"{p.diffs.run}-round-{n:03d}"


def round_prefix(n: int) -> str:
    """Diff ids of round n: r001-ht00000, ... (distinct from every other store's)."""
    return f"r{n:03d}-ht"


def finished_rounds(p: Params) -> list[int]:
    """Round numbers whose store holds round.json, ascending."""
    out = []
    for d in retrain_root(p).glob(f"{glob.escape(p.diffs.run)}-round-*"):
        suffix = d.name[len(f"{p.diffs.run}-round-"):]
        if suffix.isdigit() and (d / ROUND_DONE).is_file():
            out.append(int(suffix))
    return sorted(out)


def _n_topics(p: Params, key: str) -> int:
    n, per = getattr(p.retrain, key), p.data.diffs_per_topic
    if n % per:
        lower = max(per, n // per * per)
        raise ConfigError(f"retrain.{key}={n} is not a multiple of data.diffs_per_topic={per} (every topic "
                          f"gets that many diffs): set retrain.{key} to {lower} or {lower + per}")
    return n // per


def plan_round(p: Params) -> dict:
    """The next round: its number, seed and folders (plain values, so a Prefect task can take it)."""
    _n_topics(p, "new_diffs")
    _n_topics(p, "benchmark_diffs")
    done = finished_rounds(p)
    n = (done[-1] if done else 0) + 1
    store = round_store(p, n)
    bench = benchmark_store(p)
    name = f"round-{n:03d}"
    return {
        "round": n,
        "seed": p.data.seed + n,  # data.seed itself stays the default pipeline's
        "resumed": store.exists(),
        "store": str(store),
        "stores": [str(round_store(p, k)) for k in done] + [str(store)],
        "benchmark": str(bench),
        "questions": str(bench / BEHAVIOR_DIR / "questions.parquet"),
        "dataset": str(retrain_root(p) / "dataset"),
        "models": str(Path(p.paths.models) / RETRAIN_DIR / name),
        "reports": str(Path(p.paths.reports) / RETRAIN_DIR / name),
    }


def round_params(p: Params, plan: dict) -> Params:
    """`p` with the round's interpreter and reports folders, so the pipeline's own are left alone."""
    return p.model_copy(update={"paths": p.paths.model_copy(update={"models": plan["models"],
                                                                     "reports": plan["reports"]})})


def _store_params(p: Params, seed: int, n_topics: int, topics_file: str | None) -> Params:
    return p.model_copy(update={"data": p.data.model_copy(
        update={"seed": seed, "n_topics": n_topics, "topics_file": topics_file})})


def _identity(ps: Params, kind: str, n: int | None, n_diffs: int, prefix: str, **extra) -> dict:
    from dit_core.behaviors import get_behavior

    return {"kind": kind, "round": n, "seed": ps.data.seed, "n_diffs": n_diffs, "id_prefix": prefix,
            **extra, **get_behavior(BEHAVIOR).made_with(ps)}


def _changed(store: Path, identity: dict, keys=None) -> list[str] | None:
    """Keys of `identity` that differ from the store's record (None: no record yet), among `keys`."""
    changed = compare_record(store / IDENTITY, identity)
    return changed if changed is None or keys is None else [k for k in changed if k in keys]


def _complete(store: Path) -> bool:
    summary = store / "summary.json"
    return ((store / "manifest.parquet").is_file() and summary.is_file()
            and not json.loads(summary.read_text()).get("stopped"))


def _make_store(ps: Params, store: Path, id_prefix: str) -> dict:
    """Behaviour data, then every shard of the store (finished shards kept), then its manifest: the
    make-data and generate-diffs stages, into the store's own folders."""
    from dit_core.diffs.generate import generate_diffs
    from dit_core.stages import run_make_data, stage_paths, wrapped_model

    behavior = store / BEHAVIOR_DIR
    run_make_data(ps, behavior, id_prefix, BEHAVIOR)
    lm, dm = wrapped_model(str(stage_paths(ps).model), ps.model.device, ps.model.dtype, ps.diffs.modules)
    summary = generate_diffs(ps, lm, behavior, store, dm)
    stopped = summary.get("stopped")
    if stopped:
        raise RuntimeError(f"{store}: diff generation stopped early ({stopped}); its finished shards are kept: "
                           "rerun the round (`dit retrain`, with a larger --budget) to finish the store first")
    return summary


def make_benchmark(p: Params) -> dict:
    """The benchmark store, made once; later rounds use it as it is."""
    store = benchmark_store(p)
    ps = _store_params(p, p.retrain.benchmark_seed, _n_topics(p, "benchmark_diffs"), p.data.topics_file)
    identity = _identity(ps, "benchmark", None, p.retrain.benchmark_diffs, BENCHMARK_PREFIX)
    fixed = _changed(store, identity, ("seed", "n_diffs", "id_prefix"))
    if fixed:
        old = json.loads((store / IDENTITY).read_text())
        raise RuntimeError(
            f"{store} is the benchmark every round is scored on; it was made with "
            f"{', '.join(f'{k}={old.get(k)}' for k in fixed)}, the params now ask for "
            f"{', '.join(f'{k}={identity[k]}' for k in fixed)}. Restore retrain.benchmark_seed / "
            f"retrain.benchmark_diffs, or move {store} away to make a new benchmark (the champion is then "
            "re-scored on it)")
    changed = _changed(store, identity)
    if _complete(store):
        if changed:  # e.g. data.n_trigger: a fixed benchmark is not remade for it
            log.info("benchmark %s kept as made (other data settings then: %s)", store, ", ".join(changed))
        summary = json.loads((store / "summary.json").read_text())
        return summary | {"skipped": True, "store": str(store)}
    if changed:
        raise RuntimeError(f"{store} was started with other settings ({', '.join(changed)} differ) and is "
                           f"not finished: restore them, or delete {store} to make it again")
    if changed is None:
        write_json_atomic(store / IDENTITY, identity)
    return _make_store(ps, store, BENCHMARK_PREFIX) | {"store": str(store)}


def _topic_pool(p: Params, bench: Path) -> tuple[pl.DataFrame, list[str]]:
    """The topic list without the benchmark's topics, and those topics."""
    from dit_core.data.topics import load_topics

    held = sorted(set(pl.read_parquet(bench / BEHAVIOR_DIR / "diffs.parquet")["topic"]))
    lowered = {t.lower() for t in held}
    pool = load_topics(p.data.topics_file).filter(~pl.col("topic").str.to_lowercase().is_in(lowered))
    return pool, held


def make_round(p: Params, plan: dict) -> dict:
    """This round's store: retrain.new_diffs diffs from the round's seed, on topics the benchmark lacks."""
    n, store = plan["round"], Path(plan["store"])
    pool, held = _topic_pool(p, Path(plan["benchmark"]))
    n_topics = _n_topics(p, "new_diffs")
    if n_topics > pool.height:
        raise ConfigError(f"retrain.new_diffs={p.retrain.new_diffs} needs {n_topics} topics but only "
                          f"{pool.height} are left outside the benchmark; lower retrain.new_diffs or use a "
                          "longer data.topics_file")
    topics_file = store / "topics.csv"
    ps = _store_params(p, plan["seed"], n_topics, str(topics_file))
    identity = _identity(ps, "round", n, p.retrain.new_diffs, round_prefix(n), benchmark_topics=held)
    changed = _changed(store, identity)
    if changed:
        raise RuntimeError(f"{store} (round {n}, not finished) was started with other settings "
                           f"({', '.join(changed)} differ): restore them to finish round {n}, or delete "
                           f"{store} to start it again with these")
    if changed is not None and _complete(store):
        log.info("round %d: %s already holds its %d diffs", n, store, p.retrain.new_diffs)
        return json.loads((store / "summary.json").read_text()) | {"skipped": True, "store": str(store)}
    text = pool.write_csv()
    if not topics_file.is_file() or topics_file.read_text() != text:
        with atomic_path(topics_file) as tmp:
            tmp.write_text(text)
    if changed is None:
        write_json_atomic(store / IDENTITY, identity)
    return _make_store(ps, store, round_prefix(n)) | {"store": str(store)}


def benchmark_version(dataset_dir: str | Path) -> str:
    """Name of the dataset's test split from its rows alone (ids, labels, triggers, shard hashes): the
    same in every round while the benchmark store and the behaviour filters stay the same."""
    test = (pl.read_parquet(Path(dataset_dir) / "dataset.parquet").filter(pl.col("split") == "test")
            .sort("diff_id").select("diff_id", "label", "trigger", "shard_sha256"))
    digest = hashlib.sha256(json.dumps(test.rows()).encode()).hexdigest()[:16]
    return f"benchmark-{digest}"


def assemble_round(p: Params, plan: dict) -> dict:
    """Every round store's train/val plus the benchmark as the test split, into the retrain dataset."""
    from dit_core.interpreter.training import dataset_version
    from dit_core.stages import run_assemble

    out = Path(plan["dataset"])
    report = run_assemble(p, [Path(s) for s in plan["stores"]], Path(plan["benchmark"]), out)
    return report | {"test_set": benchmark_version(out), "dataset_version": dataset_version(out / "dataset.parquet")}


def registered_interpreter(rp: Params, dataset: str | Path) -> dict | None:
    """The round's interpreter when it was trained on this dataset and registered already (a resumed
    round reuses it instead of registering a second version), else None."""
    from dit_core.interpreter.training import dataset_version
    from dit_core.stages import interpreter_dir

    out = interpreter_dir(rp)
    files = [out / f for f in ("interpreter.json", "summary.json", "registry.json")]
    if not all(f.is_file() for f in files):
        return None
    summary = json.loads(files[1].read_text())
    if summary.get("data_version") != dataset_version(Path(dataset) / "dataset.parquet"):
        return None
    return summary | {"registered": json.loads(files[2].read_text()), "dataset": str(dataset), "reused": True}


def finish_round(plan: dict, record: dict) -> dict:
    """Write round.json into the round's store: from now on the round counts as finished."""
    record = {"round": plan["round"], "seed": plan["seed"], "store": plan["store"], "stores": plan["stores"],
              "benchmark": plan["benchmark"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **record}
    write_json_atomic(Path(plan["store"]) / ROUND_DONE, record)
    return record
