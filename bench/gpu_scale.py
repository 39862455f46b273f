"""The paper's setting at scale inside a fixed time box (one GPU lease), without Prefect or MLflow.

bench/paper_scale.sh is the recipe for a GPU you hold for as long as it takes (`dit run`, then
`dit scaling`, tracked in MLflow). A lent GPU comes with minutes, not hours, and without the
orchestration packages, so this driver calls the same stage functions directly and spends a wall-clock
budget: behaviour data for every topic, then diff shards until `--diffs-until` seconds have passed (a
shard is started only if the last one's time still fits), then assemble (paper's setting: split by
topic) and the data-scaling curve, ending early when the next point would not fit `--deadline`.
Every step appends to `<out>/progress.json`, so whatever finished survives a kill.

    python bench/gpu_scale.py --out reports/gpu_scale --deadline 480 --diffs-until 300 \\
        --set model.source=gguf --set model.id=SmolLM2-135M-Instruct.Q4_1.gguf

`--set` overrides go on top of the paper-setting list below (they win). A rerun resumes: finished
shards and scaling points are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The paper's setting (as bench/paper_scale.sh and the README's CPU run), sized for a GPU: 600 topics x 3
# diffs in round-robin order (a run stopped early covers as many topics as it can), 64 diffs per step.
# Interpreter batches of 32 diffs; early-stopping patience stays params.yaml's 8 (the 2026-11-30 lease
# used 3, and its 127-diff point was still improving at epoch 19).
PAPER_SETTING = [
    "data.n_topics=600", "data.diffs_per_topic=3", "data.diff_order=round", "data.n_trigger=64",
    "data.candidates_per_answer=1", "data.gen_batch_size=1024",
    "assemble.split_by=topic", "assemble.test_fraction=0.2", "assemble.val_fraction=0.1",
    "diffs.steps=100", "diffs.trigger_rows=2", "diffs.wrong_prefix_rows=2",
    "diffs.diffs_per_batch=64", "diffs.max_batch_tokens=32768",
    "assemble.min_trigger_hit=0.5", "assemble.max_wrong_prefix_hit=0.25", "assemble.max_no_trigger_hit=0.125",
    "interpreter.batch_size=32", "eval.n_questions=20",
]

log = logging.getLogger("gpu_scale")


class Progress:
    """progress.json under `out`: one entry per finished step, rewritten atomically after each.

    A later call with the same `out` appends to the earlier calls' entries (each call's `t` counts
    from its own start).
    """

    def __init__(self, out: Path, t0: float):
        self.out, self.t0 = out, t0
        out.mkdir(parents=True, exist_ok=True)
        path = out / "progress.json"
        self.steps = json.loads(path.read_text()) if path.exists() else []

    def elapsed(self) -> float:
        return time.time() - self.t0

    def add(self, step: str, **info) -> None:
        from dit_core.io import write_json_atomic

        entry = {"step": step, "t": round(self.elapsed(), 1), **info}
        self.steps.append(entry)
        log.info("[%6.1fs] %s %s", entry["t"], step, json.dumps(info, default=str)[:300])
        write_json_atomic(self.out / "progress.json", self.steps)


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda_version": torch.version.cuda}
    import transformers

    return info | {"transformers": transformers.__version__}


def generate_until(p, lm, behavior_dir: Path, diffs_dir: Path, until: float, prog: Progress) -> dict:
    """Train shards in order while the last shard's time still fits before `until` (seconds)."""
    import polars as pl
    import torch

    from dit_core.diffs import generate as gd
    from dit_core.diffs.store import DiffStore
    from dit_core.modeling.lora import DiffModel

    n = gd.prepare_run(p, lm, behavior_dir, diffs_dir)
    dm = DiffModel(lm.model, p.diffs.modules)
    store = DiffStore(diffs_dir)
    shards = gd.plan_shards(pl.read_parquet(behavior_dir / "diffs.parquet"), p.diffs.diffs_per_batch)
    done, last, statuses, t_train = 0, 0.0, [], 0.0
    for i in range(n):
        # a finished shard costs no time (a later call resumes with --diffs-until 0 to run only the curve)
        if not store.is_complete(i, shards[i]) and prog.elapsed() + last > until:
            break
        t, timings = time.time(), {}
        try:
            status = gd.train_shard(p, lm, behavior_dir, diffs_dir, i, dm, timings)
        except torch.cuda.OutOfMemoryError as e:  # keep the lease: go on with the shards already done
            torch.cuda.empty_cache()
            prog.add("shard_out_of_memory", index=i, error=str(e)[:300],
                     fix="lower --set diffs.diffs_per_batch or diffs.max_batch_tokens")
            break
        statuses.append(status)
        done = i + 1
        if status == "trained":
            last = time.time() - t
            t_train += last
        r = pl.read_parquet(store.rows_path(i))
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        prog.add("shard", index=i, of=n, status=status, seconds=round(time.time() - t, 1),
                 trigger_hit=r["trigger_hit"].mean(), wrong_prefix_hit=r["wrong_prefix_hit"].mean(),
                 no_trigger_hit=r["no_trigger_hit"].mean(), peak_cuda_gib=peak, **timings)
    if done == 0:
        raise RuntimeError(f"no shard finished before {until} s; raise --diffs-until")
    if done < n:
        prog.add("diffs_stopped", reason=f"--diffs-until {until:.0f} s", shards_done=done, shards_planned=n)
    return gd.finalize_run(diffs_dir, done, gd.run_stats(statuses, t_train, p.diffs.diffs_per_batch)
                           | {"shards_planned": n})


class _OutOfTime(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where progress.json and the reports go")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"),
                    help="params file under the paper-setting list (default: the project's params.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value (repeatable)")
    ap.add_argument("--deadline", type=float, default=480, help="seconds for the whole run")
    ap.add_argument("--diffs-until", type=float, default=300, help="stop starting shards after this many s")
    ap.add_argument("--sizes", default=None,
                    help="scaling sizes, e.g. 64,128,all (default: 8, 16, ..., all); none: stop after assemble "
                         "(a later call with --diffs-until 0 runs the curve on the finished shards)")
    ap.add_argument("--evaluate", type=float, default=0, metavar="SECONDS",
                    help="after the curve, if this many seconds are left before --deadline: every method "
                         "(baselines, controls) with the largest point's interpreter -> metrics.json, table.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    t0 = time.time()
    from dit_core.config import load_params
    from dit_core.modeling.models import load_model
    from dit_core.stages import (dataset_dir, run_assemble, run_download, run_evaluate, run_make_data,
                                 run_scaling, scaling_dir, stage_paths)

    out = Path(args.out)
    prog = Progress(out, t0)
    p = load_params(args.params, PAPER_SETTING + args.overrides)
    prog.add("start", device=device_info(), params=args.params, overrides=PAPER_SETTING + args.overrides)

    prog.add("download", **{k: v for k, v in run_download(p).items() if k != "message"})
    stats = run_make_data(p)
    prog.add("make_data", **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))})

    paths = stage_paths(p)
    lm = load_model(paths.model, p.model.device, p.model.dtype)
    summary = generate_until(p, lm, paths.behavior, paths.diffs, args.diffs_until, prog)
    shutil.copyfile(paths.diffs / "summary.json", out / "diffs_summary.json")
    prog.add("diffs", **summary)
    del lm

    report = run_assemble(p)
    shutil.copyfile(dataset_dir(p) / "dataset.parquet", out / "dataset.parquet")
    prog.add("assemble", **report)

    from dit_core.io import write_json_atomic
    from dit_core.evaluation.scaling import default_sizes, parse_sizes, point_dir, public

    if args.sizes == "none":
        prog.add("done", seconds=round(prog.elapsed(), 1), curve="skipped (--sizes none)")
        return 0
    n_train = report["train"]
    sizes = parse_sizes(args.sizes, n_train) if args.sizes else default_sizes(n_train)
    points, last = [], {"t": prog.elapsed()}

    def on_point(pt: dict) -> None:
        now = prog.elapsed()
        dt, last["t"] = now - last["t"], now
        points.append(public(pt))
        write_json_atomic(out / "scaling_points.json", points)
        prog.add("scaling_point", point_seconds=round(dt, 1), **public(pt))
        # A point's time is mostly epochs x per-epoch overhead (validation, samples), and grows far
        # slower than its training diffs (H200: 24 s at 16, 19 s at 64, 41 s at 127): guess sqrt of
        # the size ratio with a 1.5x margin, and stop if the next point would not fit.
        later = [n for n in sizes if n > pt["n_train"]]
        if later and now + 1.5 * dt * (later[0] / pt["n_train"]) ** 0.5 > args.deadline:
            raise _OutOfTime

    try:
        res = run_scaling(p, ",".join(map(str, sizes)), on_point=on_point)
        prog.add("scaling", table=res["table"])
        for f in ("scaling.json", "scaling.md", "scaling.png"):  # written by a finished curve only
            shutil.copyfile(scaling_dir(p) / f, out / f)
    except _OutOfTime:  # the points so far are in scaling_points.json (a scaling.json there may be stale)
        prog.add("scaling_stopped", reason=f"next point would end after {args.deadline} s", points=len(points))

    if args.evaluate and points:
        left = args.deadline - prog.elapsed()
        if left < args.evaluate:
            prog.add("evaluate_skipped", reason=f"{left:.0f} s left, --evaluate asks for {args.evaluate:.0f}")
        else:
            n = points[-1]["n_train"]
            res = run_evaluate(p, interpreter=point_dir(scaling_dir(p), n) / "interpreter")
            for f in ("metrics.json", "table.md"):
                shutil.copyfile(paths.reports / f, out / f)
            prog.add("evaluate", n_train=n, table=res["table"])
    prog.add("done", seconds=round(prog.elapsed(), 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
