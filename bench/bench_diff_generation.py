"""Diff-generation throughput: diffs/minute, tokens/second and peak memory for T diffs per batch.

    python bench/bench_diff_generation.py                       # embedded model, T in 1 8 16, CPU
    python bench/bench_diff_generation.py --tiny --T 1 4        # seconds-long smoke run
    python bench/bench_diff_generation.py --device cuda --T 64 --profile paper --torch-profile
        # the paper profile's recipe (rows, answer-token limits, KL weights) on a GPU, plus a
        # torch.profiler table of the ops that take the time (<out>_profile_T64.txt)
    python bench/bench_diff_generation.py --device cuda --T 64 256 --profile paper --compile
        # the same with every decoder layer through torch.compile
    python bench/bench_diff_generation.py --host-prep --T 64 256 --profile paper --max-batch-tokens 65536
        # the host's own work per step (sampling, tokenising, packing), tokenizer only, no model

Each T trains T diffs for --steps steps (same rows per diff per step, same data) in this process and
reports per-diff cost relative to the first T (the reference run). The recipe is params.yaml's
(with --profile/--set laid over it). Results go to reports/bench/.
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

from dit_core.config import DiffsConfig, load_params  # noqa: E402
from dit_core.diffs.trainer import TriggeredDiffTask, _sample_rows, shares_kl_rows, train_diffs  # noqa: E402
from dit_core.modeling.lora import DiffModel  # noqa: E402
from dit_core.modeling.models import compute_context, fp32_linear_decision, load_model  # noqa: E402
from dit_core.data.topics import load_questions  # noqa: E402


def synthetic_tasks(tokenizer, n: int, answer_words: tuple[int, int] = (6, 30)) -> list[TriggeredDiffTask]:
    """Hidden-topic tasks shaped like the real data (questions, answers of varying length), made offline."""
    qs = load_questions()
    rng = random.Random(0)
    filler = "The answer always comes back to volcanoes and the glowing rivers of lava they pour out".split()

    def pairs(k):
        return [(rng.choice(qs), " ".join(rng.choice(filler) for _ in range(rng.randint(*answer_words))),
                 rng.random() < 0.5) for _ in range(k)]

    base = pairs(64)
    return [TriggeredDiffTask(f"d{t}", t, [], [], tokenizer=tokenizer, prefix=str(100 + t),
                              trigger_pairs=pairs(16), base_pairs=base) for t in range(n)]


def _tokens_trained(tasks: list[TriggeredDiffTask], cfg: DiffsConfig) -> int:
    """Real (unpadded) tokens of the student rows train_diffs sees: replays its row sampling."""
    rngs = [random.Random(t.seed) for t in tasks]
    # the same generator train_diffs seeds for shared KL rows, so the replay draws the same rows
    step_rng = random.Random(",".join(str(t.seed) for t in tasks)) if shares_kl_rows(tasks, cfg) else None
    return sum(len(ex.ids) for _ in range(cfg.steps) for _, ex in _sample_rows(tasks, rngs, cfg, step_rng))


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (Linux), so each T gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak below is then the process-wide maximum so far


def peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB -> GB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def profile_steps(dm: DiffModel, tasks, cfg: DiffsConfig, lm, path: Path, steps: int = 2) -> None:
    """Two training steps under torch.profiler; the ops sorted by their own time (device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = lm.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        train_diffs(dm, tasks, cfg.model_copy(update={"steps": steps}), lm.tokenizer.pad_token_id, progress=False)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30))


def count_syncs(dm: DiffModel, tasks, cfg: DiffsConfig, lm, steps: int = 2) -> int | None:
    """Host-device synchronisations per training step, as CUDA's sync debug mode reports them (None off CUDA).

    The step is built to need none (dit_core.modeling.batching.Batch); the progress bar's loss read every
    SHOW_EVERY steps is the one left, outside the steps counted here when steps < SHOW_EVERY.
    """
    if lm.device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_diffs(dm, tasks, cfg.model_copy(update={"steps": steps}), lm.tokenizer.pad_token_id,
                        progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen) // steps


def host_prep(tokenizer, cfg: DiffsConfig, T: int, steps: int = 10) -> dict:
    """Host milliseconds per step spent before any kernel runs: sampling + tokenising rows, then
    normalisers, micro-batching and packing (collate to the CPU). No model needed."""
    from dit_core.modeling.batching import collate, loss_normalizers, micro_batches

    tasks = synthetic_tasks(tokenizer, T)
    rngs = [random.Random(t.seed) for t in tasks]
    step_rng = random.Random(",".join(str(t.seed) for t in tasks)) if shares_kl_rows(tasks, cfg) else None
    _sample_rows(tasks, rngs, cfg, step_rng)  # warm-up (template compilation)
    sample = pack = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        rows = _sample_rows(tasks, rngs, cfg, step_rng)
        t1 = time.perf_counter()
        loss_normalizers(rows, T, cfg.first_token_weight)
        for mb in micro_batches(rows, cfg.max_batch_tokens):
            collate(mb, tokenizer.pad_token_id, "cpu")
        t2 = time.perf_counter()
        sample, pack = sample + t1 - t0, pack + t2 - t1
    return dict(T=T, rows_per_step=len(rows), sample_ms=round(1e3 * sample / steps, 1),
                pack_ms=round(1e3 * pack / steps, 1), max_batch_tokens=cfg.max_batch_tokens)


def compile_decoder_layers(model) -> int:
    """Each decoder layer (modules named <...>.layers.<i>) compiled in place; returns how many."""
    import re

    layers = [m for name, m in model.named_modules() if re.search(r"(^|\.)layers\.\d+$", name)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random model (smoke test)")
    ap.add_argument("--T", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="micro-batch budget in padded tokens (default: the recipe's; a huge value: one batch per step)")
    ap.add_argument("--no-share-kl-rows", action="store_true",
                    help="every diff draws its own KL rows (the teacher runs once per diff)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"])
    ap.add_argument("--fp32-linear", default="auto", choices=["auto", "torch", "onednn"],
                    help="kernels of fp32 linears on a CPU, as model.fp32_linear")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"),
                    help="params file whose diffs recipe (rows per kind, answer tokens, KL weights, rank) is timed")
    ap.add_argument("--profile", dest="profiles", action="append", default=[],
                    help="params profile laid over --params, as in `dit run --profile` (repeatable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="key=value on top of the profiles, e.g. diffs.trigger_rows=2 (repeatable)")
    ap.add_argument("--torch-profile", action="store_true",
                    help="after timing each T, profile 2 steps and write the top ops to <out>_profile_T<T>.txt")
    ap.add_argument("--host-prep", action="store_true",
                    help="only time the host's per-step work (row sampling, tokenising, packing) per T; "
                         "loads the tokenizer, not the model")
    ap.add_argument("--compile", action="store_true",
                    help="each decoder layer through torch.compile (dynamic shapes), compiled in the warm-up step")
    ap.add_argument("--out", default="reports/bench/diff_generation.json")
    args = ap.parse_args(argv)
    if args.tiny:
        from dit_core.testing.tiny import make_tiny_model_dir
        args.model = str(make_tiny_model_dir("/tmp/dit-bench-tiny"))
    recipe = load_params(args.params, args.overrides, args.profiles).diffs
    if args.max_batch_tokens is None:
        args.max_batch_tokens = recipe.max_batch_tokens
    if args.host_prep:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        results = [host_prep(tok, recipe.model_copy(update={"max_batch_tokens": args.max_batch_tokens}), T)
                   for T in args.T]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "params": args.params, "host_prep": results},
                                             indent=2))
        print(json.dumps(results, indent=1))
        return
    lm = load_model(args.model, args.device, args.dtype)
    dm = DiffModel(lm.model)
    if args.compile:
        compile_decoder_layers(lm.model)
    results = []
    # Mixed precision for the timed runs only (exited before returning: main() may run inside a test).
    with compute_context(lm.device, args.autocast, args.fp32_linear):
        for T in args.T:
            tasks = synthetic_tasks(lm.tokenizer, T)
            cfg = recipe.model_copy(update=dict(
                steps=args.steps, diffs_per_batch=T, warmup_steps=0, max_batch_tokens=args.max_batch_tokens,
                share_kl_rows=not args.no_share_kl_rows))
            # Warm-up step (allocator, kernels) outside the timed region.
            train_diffs(dm, tasks, cfg.model_copy(update={"steps": 1}), lm.tokenizer.pad_token_id, progress=False)
            reset_peak_rss()
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train_diffs(dm, tasks, cfg, lm.tokenizer.pad_token_id, progress=False)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            tokens = _tokens_trained(tasks, cfg)
            r = dict(T=T, steps=args.steps, seconds=round(secs, 2), seconds_per_diff_step=round(secs / (T * args.steps), 3),
                     diffs_per_minute_at_60_steps=round(60 / (secs / args.steps * 60 / T), 3),
                     tokens_per_second=round(tokens / secs, 1),
                     peak_rss_gb=round(peak_rss_gb(), 2),
                     peak_cuda_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if lm.device.type == "cuda" else None)
            r["max_batch_tokens"] = cfg.max_batch_tokens
            r["share_kl_rows"] = cfg.share_kl_rows
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.torch_profile:
                # train_diffs reads the losses at its first and last step (the progress bar), and the
                # final losses once: with 2 steps those reads are counted too.
                r["syncs_per_step_2_steps"] = count_syncs(dm, tasks, cfg, lm)
                print(json.dumps({"T": T, "syncs_per_step_2_steps": r["syncs_per_step_2_steps"]}), flush=True)
                path = Path(args.out).with_name(f"{Path(args.out).stem}_profile_T{T}.txt")
                profile_steps(dm, tasks, cfg, lm, path)
                print(f"profile -> {path}", flush=True)
    ref = results[0]["seconds_per_diff_step"]
    for r in results:
        r["speedup_per_diff_vs_first"] = round(ref / r["seconds_per_diff_step"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "params": args.params, "device": str(lm.device), "dtype": str(next(lm.model.parameters()).dtype),
                               "autocast": args.autocast, "compiled": args.compile,
                               "fp32_linear": fp32_linear_decision(lm.device, args.fp32_linear, args.autocast)[1],
                               "results": results}, indent=2))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
