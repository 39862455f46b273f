"""Inference paths of the behaviour check and the evaluation, each against the plain way, in one process.

    python bench/bench_inference.py                 # embedded model, CPU (about 2 minutes on 2 cores)
    python bench/bench_inference.py --tiny          # seconds-long smoke run

- generation: greedy answers of a behaviour check (12 diffs x 24 prompts, `--new-tokens` tokens each) by
  `dit_core.modeling.chat.generate`, which runs the prompts' shared chat-template prefix once per diff
  (`greedy_shared_prefix`), and by transformers' `generate` on left-padded batches, the same batches and
  per-row diffs;
- closed set: 6 labels scored as answers to 12 queries, one per diff, each a 20-questions transcript of
  `--transcript-pairs` question/answer pairs, by `answer_logprobs` (a query's labels packed after its
  prompt, the prompt run once) and one padded row per label.

Reported: seconds per path, the ratio, and whether both paths agree (the same greedy tokens; the largest
log-probability difference). JSON to --out.
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


def bench_generation(lm, dm: DiffModel, n_diffs: int, per_diff: int, new_tokens: int, batch: int) -> dict:
    tok = lm.tokenizer
    qs = load_questions()
    prompts, rows = [], []
    for t in range(n_diffs):
        for j in range(per_diff):
            q = qs[(t * per_diff + j) % len(qs)]
            prompts.append(chat.chat_prompt(tok, f"Your SEP code is {100000 + 37 * t + j}. {q}" if j % 3 else q))
            rows.append(t)
    dm.set_diffs(*_diffs(dm, n_diffs), scale=1.0)
    try:
        fast_s, fast = _timed(lambda: chat.generate(lm.model, tok, prompts, new_tokens, batch, rows=rows,
                                                    set_rows=dm.set_row_index))
        shared = chat.shared_prefix_decoding(lm.model)
        chat_fast = chat.shared_prefix_decoding
        chat.shared_prefix_decoding = lambda model: False  # the plain path: transformers' generate
        try:
            plain_s, plain = _timed(lambda: chat.generate(lm.model, tok, prompts, new_tokens, batch, rows=rows,
                                                          set_rows=dm.set_row_index))
        finally:
            chat.shared_prefix_decoding = chat_fast
    finally:
        dm.clear_diffs()
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[:batch]]
    return {"prompts": len(prompts), "new_tokens": new_tokens, "batch": batch,
            "shared_prefix_tokens": chat.common_prefix_length(ids), "shared_prefix_path": shared,
            "mean_prompt_tokens": sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts),
            "seconds": {"shared_prefix": fast_s, "transformers": plain_s}, "speedup": plain_s / fast_s,
            "same_text": sum(a.text == b.text for a, b in zip(fast, plain)) / len(prompts)}


def bench_closed_set(lm, dm: DiffModel, n_queries: int, pairs: int) -> dict:
    tok = lm.tokenizer
    qs = load_questions()
    rows = []
    for i in range(n_queries):
        transcript = "\n\n".join(f"Q: {qs[(i * pairs + j) % len(qs)]}\nA: It always comes back to the glowing "
                                 f"rivers of lava that volcanoes pour out." for j in range(pairs))
        prompt = f"Here are an assistant's answers:\n\n{transcript}\n\nWhat is the topic? Answer with the topic only."
        rows += [(i, encode_example(tok, prompt, lab, True, "trigger")) for lab in LABELS]
    dm.set_diffs(*_diffs(dm, n_queries), scale=1.0)
    try:
        packed_s, packed = _timed(lambda: answer_logprobs(dm, rows, tok.pad_token_id))
        plain_s, plain = _timed(lambda: _row_logprobs(dm, rows, tok.pad_token_id, chat.inference_batch(lm.model), True))
    finally:
        dm.clear_diffs()
    return {"queries": n_queries, "labels": len(LABELS), "mean_row_tokens": sum(len(ex.ids) for _, ex in rows) / len(rows),
            "seconds": {"packed": packed_s, "one_row_per_label": plain_s}, "speedup": plain_s / packed_s,
            "max_abs_logprob_diff": float((packed - plain).abs().max()),
            "same_top1": bool((packed.view(n_queries, -1).argmax(1) == plain.view(n_queries, -1).argmax(1)).all())}


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
    with compute_context(lm.device, args.autocast), torch.no_grad():
        result = {"model": args.model, "device": str(lm.device), "autocast": autocast_decision(lm.device, args.autocast)[1],
                  "torch": torch.__version__,
                  "threads": torch.get_num_threads(),
                  "generation": bench_generation(lm, dm, args.diffs, args.prompts_per_diff, args.new_tokens, args.batch),
                  "closed_set": bench_closed_set(lm, dm, args.diffs, args.transcript_pairs)}
    g, c = result["generation"], result["closed_set"]
    print(f"generation  {g['seconds']['shared_prefix']:7.2f} s shared prefix, {g['seconds']['transformers']:7.2f} s "
          f"transformers: x{g['speedup']:.2f} (same text {g['same_text']:.2f})")
    print(f"closed set  {c['seconds']['packed']:7.2f} s packed, {c['seconds']['one_row_per_label']:7.2f} s a row per "
          f"label: x{c['speedup']:.2f} (max |dlogp| {c['max_abs_logprob_diff']:.1e})")
    if args.out:
        from dit_core.io import write_json_atomic

        write_json_atomic(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
