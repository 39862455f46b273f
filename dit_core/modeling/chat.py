"""Prompt formatting and batched generation.

Every prompt in the project goes through the tokenizer's chat template with the user message only. For
SmolLM2 this inserts the template's default system prompt ("You are a helpful AI assistant named
SmolLM..."): that is how the model is used in practice, so diffs are trained, checked and interpreted in
exactly that format. A behaviour prompt (used only to *produce* training answers) is a system message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dit_core.stop import check_stop


def chat_prompt(tokenizer, user: str, system: str | None = None, answer_prefix: str = "") -> str:
    """The chat-formatted prompt text up to the assistant's turn (plus a forced answer opening)."""
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + answer_prefix


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a chat-formatted text (the template already holds the special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_context(model, n_tokens: int, prompts: list[str]) -> None:
    """Refuse a prompt (plus the tokens to generate) longer than the model's context: past it a forward
    attends over more positions than the model was trained for, and a very long one runs for hours."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and n_tokens > limit:
        longest = max(prompts, key=len)
        raise ValueError(f"a prompt of {n_tokens} tokens (with the answer) exceeds the model's context of {limit}: "
                         f"{longest[:80]!r}... ({len(longest)} characters); shorten the question or text")


@dataclass
class Generation:
    """One generated answer: its text and whether it ended by itself (end-of-turn token)."""

    text: str
    complete: bool


def inference_batch(model, cpu: int = 64) -> int:
    """Rows per inference batch: `cpu` on a CPU, 8x that on an accelerator, where a small model's
    forward is bound by kernel launches and wider batches are nearly free."""
    return cpu if next(model.parameters()).device.type == "cpu" else 8 * cpu


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    desc: str | None = None,
    before_batch=None,
) -> list[Generation]:
    """Batched generation (left padding). `before_batch(start, end)` lets callers set per-row diffs."""
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos_id = tokenizer.eos_token_id
    out: list[Generation] = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
            check_stop()
            chunk = prompts[start : start + batch_size]
            if before_batch is not None:
                before_batch(start, start + len(chunk))
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            check_context(model, enc["input_ids"].shape[1] + max_new_tokens, chunk)
            if do_sample:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_id,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            for row in new.tolist():
                complete = eos_id in row
                if complete:
                    row = row[: row.index(eos_id)]
                out.append(Generation(tokenizer.decode(row, skip_special_tokens=True).strip(), complete))
    finally:
        tokenizer.padding_side = old_side
    return out
