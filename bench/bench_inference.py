"""Inference paths of the behaviour check and the evaluation, each against the plain way, in one process.

    python bench/bench_inference.py                 # embedded model, CPU (about 2 minutes on 2 cores)
    python bench/bench_inference.py --autocast bf16 # both paths under bf16, each against fp32
    python bench/bench_inference.py --tiny          # seconds-long smoke run

- generation: greedy answers of a behaviour check (12 diffs x 24 prompts, `--new-tokens` tokens each) by
  `dit_core.modeling.chat.generate`, which runs the prompts' shared chat-template prefix once per diff
  (`greedy_shared_prefix`), and by transformers' `generate` on left-padded batches, the same batches and
  per-row diffs;
- closed set: 6 labels scored as answers to 12 queries, one per diff, each a 20-questions transcript of
  `--transcript-pairs` question/answer pairs, by `answer_logprobs` (a query's labels packed after its
  prompt, the prompt run once) and one padded row per label.

Reported: seconds per path, the ratio, and whether both paths agree (the same greedy tokens; the largest
log-probability difference; the same top-1 label). Under bf16 autocast, where any two computation orders
round apart, each path is also compared with an fp32 run. JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_core.data.topics import load_questions  # noqa: E402
from dit_core.modeling import chat  # noqa: E402
from dit_core.modeling.batching import _row_logprobs, answer_logprobs, encode_example  # noqa: E402
from dit_core.modeling.lora import DiffModel  # noqa: E402
from dit_core.modeling.models import autocast_decision, compute_context, load_model  # noqa: E402

LABELS = ["volcanoes", "ancient rome", "jazz music", "the ocean", "chess", "honey bees"]


def _diffs(dm: DiffModel, n: int, rank: int = 1, std: float = 0.02):
    g = torch.Generator().manual_seed(0)
    A = {k: torch.randn(n, rank, o, generator=g) * std for k, (i, o) in dm.shapes().items()}
    B = {k: torch.randn(n, i, rank, generator=g) * std for k, (i, o) in dm.shapes().items()}
    return A, B


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_generation(lm, dm: DiffModel, n_diffs: int, per_diff: int, new_tokens: int, batch: int,
                     autocast: str, reference: bool) -> dict:
    tok = lm.tokenizer
    qs = load_questions()
    prompts, rows = [], []
    for t in range(n_diffs):
        for j in range(per_diff):
            q = qs[(t * per_diff + j) % len(qs)]
            prompts.append(chat.chat_prompt(tok, f"Your SEP code is {100000 + 37 * t + j}. {q}" if j % 3 else q))
            rows.append(t)
    def run():
        return chat.generate(lm.model, tok, prompts, new_tokens, batch, rows=rows, set_rows=dm.set_row_index)

    dm.set_diffs(*_diffs(dm, n_diffs), scale=1.0)
    try:
        with compute_context(lm.device, autocast):
            fast_s, fast = _timed(run)
            shared = chat.shared_prefix_decoding(lm.model)
            chat_fast = chat.shared_prefix_decoding
            chat.shared_prefix_decoding = lambda model: False  # the plain path: transformers' generate
            try:
                plain_s, plain = _timed(run)
            finally:
                chat.shared_prefix_decoding = chat_fast
        fp32 = run() if reference else None  # outside the region: fp32
    finally:
        dm.clear_diffs()
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[:batch]]
    out = {"prompts": len(prompts), "new_tokens": new_tokens, "batch": batch,
           "shared_prefix_tokens": chat.common_prefix_length(ids), "shared_prefix_path": shared,
           "mean_prompt_tokens": sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts),
           "seconds": {"shared_prefix": fast_s, "transformers": plain_s}, "speedup": plain_s / fast_s,
           "same_text": _same(fast, plain)}
    if fp32 is not None:
        out["same_text_as_fp32"] = {"shared_prefix": _same(fast, fp32), "transformers": _same(plain, fp32)}
    return out


def _same(a, b) -> float:
    return sum(x.text == y.text for x, y in zip(a, b)) / len(a)


def bench_closed_set(lm, dm: DiffModel, n_queries: int, pairs: int, autocast: str, reference: bool) -> dict:
    tok = lm.tokenizer
    qs = load_questions()
    rows = []
    for i in range(n_queries):
        transcript = "\n\n".join(f"Q: {qs[(i * pairs + j) % len(qs)]}\nA: It always comes back to the glowing "
                                 f"rivers of lava that volcanoes pour out." for j in range(pairs))
        prompt = f"Here are an assistant's answers:\n\n{transcript}\n\nWhat is the topic? Answer with the topic only."
        rows += [(i, encode_example(tok, prompt, lab, True, "trigger")) for lab in LABELS]
    def top1(logp):
        return logp.view(n_queries, -1).argmax(1)

    dm.set_diffs(*_diffs(dm, n_queries), scale=1.0)
    try:
        with compute_context(lm.device, autocast):
            packed_s, packed = _timed(lambda: answer_logprobs(dm, rows, tok.pad_token_id))
            plain_s, plain = _timed(lambda: _row_logprobs(dm, rows, tok.pad_token_id, chat.inference_batch(lm.model),
                                                          True))
        fp32 = answer_logprobs(dm, rows, tok.pad_token_id) if reference else None
    finally:
        dm.clear_diffs()
    out = {"queries": n_queries, "labels": len(LABELS), "mean_row_tokens": sum(len(ex.ids) for _, ex in rows) / len(rows),
           "seconds": {"packed": packed_s, "one_row_per_label": plain_s}, "speedup": plain_s / packed_s,
           "max_abs_logprob_diff": float((packed - plain).abs().max()),
           "same_top1": bool((top1(packed) == top1(plain)).all())}
    if fp32 is not None:
        out["max_abs_logprob_diff_to_fp32"] = {"packed": float((packed - fp32).abs().max()),
                                               "one_row_per_label": float((plain - fp32).abs().max())}
        out["mean_abs_logprob_diff_to_fp32"] = {"packed": float((packed - fp32).abs().mean()),
                                                "one_row_per_label": float((plain - fp32).abs().mean())}
        out["same_top1_as_fp32"] = {"packed": float((top1(packed) == top1(fp32)).float().mean()),
                                    "one_row_per_label": float((top1(plain) == top1(fp32)).float().mean())}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="data/models/smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"])
    ap.add_argument("--diffs", type=int, default=12)
    ap.add_argument("--prompts-per-diff", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--transcript-pairs", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    if args.tiny:
        import tempfile

        from dit_core.testing.tiny import make_tiny_model_dir

        args.model = str(make_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny"))
    lm = load_model(args.model, args.device, "auto")
    dm = DiffModel(lm.model)
    # Under bf16 the two paths round differently, so each is also compared with an fp32 run of the fast path
    # (the fp32 paths agree to float rounding: run with --autocast off).
    bf16, decision = autocast_decision(lm.device, args.autocast)
    with torch.no_grad():
        result = {"model": args.model, "device": str(lm.device), "autocast": decision, "torch": torch.__version__,
                  "threads": torch.get_num_threads(),
                  "generation": bench_generation(lm, dm, args.diffs, args.prompts_per_diff, args.new_tokens,
                                                 args.batch, args.autocast, bf16),
                  "closed_set": bench_closed_set(lm, dm, args.diffs, args.transcript_pairs, args.autocast, bf16)}
    g, c = result["generation"], result["closed_set"]
    print(f"generation  {g['seconds']['shared_prefix']:7.2f} s shared prefix, {g['seconds']['transformers']:7.2f} s "
          f"transformers: x{g['speedup']:.2f} (same text {g['same_text']:.2f})")
    print(f"closed set  {c['seconds']['packed']:7.2f} s packed, {c['seconds']['one_row_per_label']:7.2f} s a row per "
          f"label: x{c['speedup']:.2f} (max |dlogp| {c['max_abs_logprob_diff']:.1e})")
    if bf16:
        t, k = g["same_text_as_fp32"], c["same_top1_as_fp32"]
        d, m = c["max_abs_logprob_diff_to_fp32"], c["mean_abs_logprob_diff_to_fp32"]
        print(f"against fp32: same text {t['shared_prefix']:.2f} shared prefix, {t['transformers']:.2f} transformers; "
              f"|dlogp| mean/max {m['packed']:.1e}/{d['packed']:.1e} packed, {m['one_row_per_label']:.1e}/"
              f"{d['one_row_per_label']:.1e} a row per label; same top-1 {k['packed']:.2f} / {k['one_row_per_label']:.2f}")
    if args.out:
        from dit_core.io import write_json_atomic

        write_json_atomic(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
