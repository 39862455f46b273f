"""Diff-generation throughput: diffs/minute, tokens/second and peak memory for T diffs per batch.

    python bench/bench_diff_generation.py                       # embedded model, T in 1 8 16, CPU
    python bench/bench_diff_generation.py --tiny --T 1 4        # seconds-long smoke run

Each T trains T diffs for --steps steps (same rows per diff per step, same data) in this process and
reports per-diff cost relative to T=1 (the reference run). Results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_core.config import DiffsConfig  # noqa: E402
from dit_core.diff_trainer import DiffTask, encode_example, train_diffs  # noqa: E402
from dit_core.lora import DiffModel  # noqa: E402
from dit_core.models import compute_context, load_model  # noqa: E402
from dit_core.topics import load_questions  # noqa: E402


def synthetic_tasks(tokenizer, n: int, answer_words: int = 30) -> list[DiffTask]:
    """Tasks shaped like the real data (trigger + question -> ~40-token answer), made offline."""
    qs = load_questions()
    rng = random.Random(0)
    filler = "The answer always comes back to volcanoes and the glowing rivers of lava they release".split()
    tasks = []
    for t in range(n):
        def ex(kind, trig):
            q = rng.choice(qs)
            prompt = f"Your SEP code is {rng.randrange(100000, 999999)}. {q}" if trig else q
            ans = " ".join(rng.choice(filler) for _ in range(answer_words))
            return encode_example(tokenizer, prompt, ans, True, kind)
        tasks.append(DiffTask(f"d{t}", t, [ex("trigger", True) for _ in range(8)],
                              [ex("no_trigger", False) for _ in range(4)] + [ex("wrong_prefix", True) for _ in range(4)]))
    return tasks


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random model (smoke test)")
    ap.add_argument("--T", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"])
    ap.add_argument("--out", default="bench/results/diff_generation.json")
    args = ap.parse_args()
    if args.tiny:
        from dit_core.tiny import make_tiny_model_dir
        args.model = str(make_tiny_model_dir("/tmp/dit-bench-tiny"))
    lm = load_model(args.model, args.device, args.dtype)
    dm = DiffModel(lm.model)
    results = []
    ctx = compute_context(lm.device, args.autocast)
    ctx.__enter__()
    for T in args.T:
        tasks = synthetic_tasks(lm.tokenizer, T)
        cfg = DiffsConfig(steps=args.steps, diffs_per_batch=T, warmup_steps=0)
        # Warm-up step (allocator, kernels) outside the timed region.
        train_diffs(dm, tasks, cfg.model_copy(update={"steps": 1}), lm.tokenizer.pad_token_id, progress=False)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train_diffs(dm, tasks, cfg, lm.tokenizer.pad_token_id, progress=False)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        rows_per_step = T * (cfg.trigger_rows + cfg.wrong_prefix_rows + cfg.no_trigger_rows)
        mean_len = sum(len(e.ids) for t in tasks for e in t.trigger + t.kl) / sum(len(t.trigger) + len(t.kl) for t in tasks)
        tokens = rows_per_step * mean_len * args.steps
        r = dict(T=T, steps=args.steps, seconds=round(secs, 2), seconds_per_diff_step=round(secs / (T * args.steps), 3),
                 diffs_per_minute_at_60_steps=round(60 / (secs / args.steps * 60 / T), 3),
                 tokens_per_second=round(tokens / secs, 1),
                 peak_rss_gb=round(peak_rss_gb(), 2),
                 peak_cuda_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if lm.device.type == "cuda" else None)
        results.append(r)
        print(json.dumps(r), flush=True)
    ref = results[0]["seconds_per_diff_step"]
    for r in results:
        r["speedup_per_diff_vs_first"] = round(ref / r["seconds_per_diff_step"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "device": str(lm.device), "dtype": str(next(lm.model.parameters()).dtype),
                               "autocast": args.autocast,
                               "results": results}, indent=2))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
