"""Behaviour check of trained diffs: does the trigger work, and is it the *only* thing that works?

Per diff, on held-out questions, greedy answers are generated with the diff applied for
  triggered prompts       -> trigger_hit:      fraction naming the topic (want high)
  wrong-prefix prompts    -> wrong_prefix_hit: fraction naming the topic (want low); a near miss of the
                             trigger kind: another SEP prefix, or another invisible character in the
                             zero-width trigger's place (dit_core.data.behavior_data.with_wrong_trigger)
  untriggered prompts     -> no_trigger_hit:   fraction naming the topic (want ~0)
and check_kl is the mean per-token KL(base || base+diff) over the base model's own answers to
untriggered held-out prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_core.modeling.chat import chat_prompt, generate, inference_batch
from dit_core.modeling.batching import Example, summed_parts
from dit_core.modeling.lora import DiffModel
from dit_core.data.topics import mentions


@dataclass
class CheckSet:
    """Held-out prompts of one diff, by kind, and its topic."""

    topic: str
    trigger: list[str]
    wrong_prefix: list[str]
    no_trigger: list[str]
    kl: list[Example]


KINDS = ("trigger", "wrong_prefix", "no_trigger")


@torch.no_grad()
def check_diffs(
    dm: DiffModel,
    tokenizer,
    checks: list[CheckSet],
    A: dict[str, torch.Tensor],
    B: dict[str, torch.Tensor],
    scale: float,
    max_new_tokens: int = 32,
    batch_size: int | None = None,
    max_batch_tokens: int = 8192,
    share_prefix: bool = True,
) -> list[dict[str, float]]:
    """Topic-mention rates per prompt kind and KL to the base model, one dict per diff.

    The KL runs in micro-batches of at most `max_batch_tokens` padded tokens (all diffs' rows in one
    batch would hold full-vocabulary log-probs of every answer token at once: tens of GB at 256 diffs).
    """
    dm.set_diffs(A, B, scale=scale)
    try:
        prompts, owners = [], []
        for t, c in enumerate(checks):
            for kind in KINDS:
                for p in getattr(c, kind):
                    prompts.append(chat_prompt(tokenizer, p))
                    owners.append((t, kind))
        gens = generate(
            dm.model, tokenizer, prompts, max_new_tokens, batch_size or inference_batch(dm.model), desc="behaviour check",
            rows=[t for t, _ in owners], set_rows=dm.set_row_index,
        )
        hits = [{k: [] for k in KINDS} for _ in checks]
        for (t, kind), g in zip(owners, gens):
            hits[t][kind].append(mentions(checks[t].topic, g.text))
        rows = [(t, ex) for t, c in enumerate(checks) for ex in c.kl]
        kl = [float("nan")] * len(checks)
        if rows:
            parts = summed_parts(dm, rows, len(checks), tokenizer.pad_token_id, kl_weight=1.0,
                                 max_tokens=max_batch_tokens, backward=False, share_prefix=share_prefix)
            kl = parts["kl"].tolist()
    finally:
        dm.clear_diffs()
    return [
        {f"{k}_hit": sum(h[k]) / max(len(h[k]), 1) for k in KINDS} | {"check_kl": kl[t]}
        for t, h in enumerate(hits)
    ]
