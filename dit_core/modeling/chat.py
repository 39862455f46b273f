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


# A prompt prefix shorter than this many tokens is not worth its own forward.
MIN_SHARED_PREFIX = 8

# Generation settings of a model's generation_config that change greedy decoding; a model that sets any
# of them is decoded by transformers' generate, which applies them.
_DECODING_OPTIONS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                     "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
                     "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "suppress_tokens": (None,),
                     "begin_suppress_tokens": (None,), "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0)}


def cache_kwarg(model) -> str | None:
    """The keyword the decoder's forward takes a key/value cache by (`cache` in recent transformers,
    `past_key_values` before), or None when it takes none."""
    import inspect

    params = inspect.signature(model.base_model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def shared_prefix_decoding(model) -> bool:
    """Whether greedy answers can run on `greedy_shared_prefix`: SDPA attention (it takes a prepared 4D
    mask), a decoder that takes a cache and position ids, and no generation option that changes greedy
    decoding."""
    import inspect

    cfg = getattr(model, "generation_config", None)
    return (getattr(model.config, "_attn_implementation", None) == "sdpa" and cache_kwarg(model) is not None
            and "position_ids" in inspect.signature(model.base_model.forward).parameters
            and all(getattr(cfg, k, None) in ok for k, ok in _DECODING_OPTIONS.items()))


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least its last token."""
    first, limit = seqs[0], min(len(s) for s in seqs) - 1
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


@torch.no_grad()
def greedy_shared_prefix(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                         rows: list[int] | None = None, set_rows=None) -> list[list[int]]:
    """Greedy continuations of `prompt_ids` (one batch), the prompts' common prefix run once per diff.

    Every chat prompt opens with the same template tokens (for SmolLM2 its system prompt and the user
    turn: 30 of a behaviour-check prompt's ~52 tokens). They run once for each distinct diff of the batch
    (`rows`, installed by `set_rows(index)`; once in all without diffs), then each row's own tokens attend
    to its diff's cached keys and values, right-padded, with explicit positions and a prepared mask; each
    new token then attends to its row's prefix, its own prompt tokens and the tokens generated so far. The
    same argmax tokens as transformers' generate up to float rounding (tests/test_generation.py).
    Returns each row's new tokens: up to its end token, then `pad_id` while other rows go on.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    kwarg, base, head = cache_kwarg(model), model.base_model, model.get_output_embeddings()
    b = len(prompt_ids)
    p = common_prefix_length(prompt_ids)
    p = p if p >= MIN_SHARED_PREFIX else 0
    cache = DynamicCache()
    if p:
        uniq = sorted(set(rows)) if rows is not None else [0]
        if rows is not None:
            set_rows(torch.tensor(uniq, device=device))
        prefix = DynamicCache()
        base(input_ids=torch.tensor([prompt_ids[0][:p]] * len(uniq), device=device), use_cache=True,
             **{kwarg: prefix})
        inverse = torch.tensor([uniq.index(r) for r in rows] if rows is not None else [0] * b, device=device)
        pairs = ([(layer.keys, layer.values) for layer in prefix.layers] if hasattr(prefix, "layers")
                 else list(zip(prefix.key_cache, prefix.value_cache)))
        for i, (k, v) in enumerate(pairs):
            cache.update(k.index_select(0, inverse), v.index_select(0, inverse), i)
    if rows is not None:
        set_rows(torch.tensor(rows, device=device))
    lengths = [len(ids) - p for ids in prompt_ids]
    width = max(lengths)
    ids = torch.tensor([ids[p:] + [pad_id] * (width - n) for ids, n in zip(prompt_ids, lengths)], device=device)
    n_real = torch.tensor(lengths, device=device)
    valid = torch.arange(width, device=device)[None] < n_real[:, None]  # (b, width) the rows' own tokens
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = torch.cat([valid.new_ones(b, width, p), causal[None] & valid[:, None, :]], dim=2)[:, None]
    positions = (p + torch.arange(width, device=device)).expand(b, width)
    hidden = base(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **{kwarg: cache})[0]
    last = hidden[torch.arange(b, device=device), n_real - 1]
    out = torch.empty(b, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    seen = torch.cat([valid.new_ones(b, p), valid], dim=1)  # keys each row attends to
    for k in range(max_new_tokens):
        nxt = head(last).float().argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, k] = nxt
        done |= nxt == eos_id
        if k == max_new_tokens - 1 or bool(done.all()):
            out = out[:, : k + 1]
            break
        seen = torch.cat([seen, seen.new_ones(b, 1)], dim=1)
        hidden = base(input_ids=nxt[:, None], position_ids=(p + n_real + k)[:, None], attention_mask=seen[:, None, None],
                      use_cache=True, **{kwarg: cache})[0]
        last = hidden[:, -1]
    return out.tolist()


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
    rows: list[int] | None = None,
    set_rows=None,
) -> list[Generation]:
    """Batched generation. With `rows` (the diff of each prompt), `set_rows(index)` installs the diffs of
    the rows of each forward (e.g. `DiffModel.set_row_index`).

    Greedy answers run on `greedy_shared_prefix` where the model allows it, sampled ones (and greedy ones
    elsewhere) on transformers' generate with left padding.
    """
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    fast = not do_sample and shared_prefix_decoding(model)
    out: list[Generation] = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
            check_stop()
            chunk = prompts[start : start + batch_size]
            chunk_rows = rows[start : start + len(chunk)] if rows is not None else None
            if fast:
                ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
                check_context(model, max(len(i) for i in ids) + max_new_tokens, chunk)
                new = greedy_shared_prefix(model, ids, max_new_tokens, eos_id, pad_id, chunk_rows, set_rows)
            else:
                if chunk_rows is not None:
                    set_rows(torch.tensor(chunk_rows, device=device))
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
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                )
                new = ids[:, enc["input_ids"].shape[1] :].tolist()
            for row in new:
                complete = eos_id in row
                if complete:
                    row = row[: row.index(eos_id)]
                out.append(Generation(tokenizer.decode(row, skip_special_tokens=True).strip(), complete))
    finally:
        tokenizer.padding_side = old_side
    return out
