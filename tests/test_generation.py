"""Greedy generation with the prompts' shared prefix run once per diff gives transformers' tokens."""

import pytest
import torch

from dit_core.modeling import chat
from dit_core.modeling.chat import chat_prompt, generate, greedy_shared_prefix, shared_prefix_decoding
from dit_core.modeling.lora import DiffModel

QUESTIONS = ["What is the best way to learn a language?", "Why is the sky blue?", "Name a fruit.",
             "Your SEP code is 482913. How do bees make honey, and why do they need so much of it?"]


@pytest.fixture()
def lm(tiny_model_dir):
    from dit_core.modeling.models import load_model

    return load_model(tiny_model_dir, "cpu", "float32")


def _diffs(dm, n=3):
    g = torch.Generator().manual_seed(0)
    A = {k: torch.randn(n, 2, o, generator=g) * 0.3 for k, (i, o) in dm.shapes().items()}
    B = {k: torch.randn(n, i, 2, generator=g) * 0.3 for k, (i, o) in dm.shapes().items()}
    return A, B


def _reference(model, tok, prompts, n, eos_id, rows=None, dm=None):
    """transformers' greedy generate, one prompt at a time (no padding), its new tokens up to eos."""
    out = []
    for i, p in enumerate(prompts):
        if rows is not None:
            dm.set_row_index(torch.tensor([rows[i]]))
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=eos_id, eos_token_id=eos_id)
        row = new[0, ids.shape[1]:].tolist()
        out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return out


def _cut(rows, eos_id):
    return [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]


def test_shared_prefix_greedy_equals_transformers_with_per_row_diffs(lm):
    tok, model = lm.tokenizer, lm.model
    dm = DiffModel(model)
    assert shared_prefix_decoding(model)
    prompts = [chat_prompt(tok, q) for q in QUESTIONS] * 2
    rows = [0, 1, 2, 0, 2, 2, 1, 0]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert chat.common_prefix_length(ids) >= chat.MIN_SHARED_PREFIX  # the template's opening is shared
    A, B = _diffs(dm)
    dm.set_diffs(A, B, scale=1.0)
    eos = tok.eos_token_id
    ours = greedy_shared_prefix(model, ids, 10, eos, eos, rows, dm.set_row_index)
    ref = _reference(model, tok, prompts, 10, eos, rows, dm)
    dm.clear_diffs()
    assert _cut(ours, eos) == ref
    assert len({tuple(r) for r in ref}) > 2  # the diffs change the answers: rows were not mixed up
    # the same through generate(), whose batches of 3 each run their own prefix
    dm.set_diffs(A, B, scale=1.0)
    texts = [g.text for g in generate(model, tok, prompts, 10, batch_size=3, rows=rows, set_rows=dm.set_row_index)]
    dm.clear_diffs()
    assert texts == [tok.decode(r[:-1] if r and r[-1] == eos else r, skip_special_tokens=True).strip() for r in ref]


def test_rows_that_end_early_and_no_shared_prefix(lm):
    tok, model = lm.tokenizer, lm.model
    dm = DiffModel(model)
    dm.set_diffs(*_diffs(dm, 4), scale=3.0)  # the random tiny model alone repeats one token
    rows = dict(rows=list(range(4)), set_rows=dm.set_row_index)
    prompts = [chat_prompt(tok, q) for q in QUESTIONS]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    free = greedy_shared_prefix(model, ids, 8, -1, 0, **rows)  # no end token: every row runs 8 tokens
    # an end token that some row first reaches after its first token
    r, k = next((r, k) for r in range(len(free)) for k in range(1, 8) if free[r][k] not in free[r][:k])
    eos = free[r][k]
    ours = greedy_shared_prefix(model, ids, 8, eos, 0, **rows)
    assert ours[r][: k + 1] == free[r][: k + 1] and all(t == 0 for t in ours[r][k + 1:])  # padded after its end
    assert any(len(_cut([row], eos)[0]) == 8 for row in ours)  # ... while others go on
    assert _cut(ours, eos) == _reference(model, tok, prompts, 8, eos, list(range(4)), dm)
    # prompts without a common opening: no prefix forward, the same tokens as transformers
    bare = [tok(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    assert chat.common_prefix_length(bare) < chat.MIN_SHARED_PREFIX
    assert (_cut(greedy_shared_prefix(model, bare, 6, eos, 0, **rows), eos)
            == _reference(model, tok, QUESTIONS, 6, eos, list(range(4)), dm))


@pytest.mark.parametrize("how", ["eager", "repetition_penalty", "sampling"])
def test_other_decoding_stays_on_transformers_generate(lm, monkeypatch, how):
    tok, model = lm.tokenizer, lm.model
    calls = []
    monkeypatch.setattr(chat, "greedy_shared_prefix", lambda *a, **k: calls.append(1))
    if how == "eager":
        monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    if how == "repetition_penalty":
        monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    out = generate(model, tok, [chat_prompt(tok, q) for q in QUESTIONS], 4, do_sample=how == "sampling")
    assert len(out) == len(QUESTIONS) and calls == []
    if how != "sampling":
        assert not shared_prefix_decoding(model)
