"""Closed-set scoring: answers packed after their shared prompt score as one row per answer does."""

import pytest
import torch

from dit_core.modeling import batching
from dit_core.modeling.batching import Example, _row_logprobs, answer_logprobs, pack_answers, packs_answers
from dit_core.modeling.lora import DiffModel


@pytest.fixture()
def dm(tiny_model_dir):
    from dit_core.modeling.models import load_model

    dm = DiffModel(load_model(tiny_model_dir, "cpu", "float32").model)
    g = torch.Generator().manual_seed(0)
    A = {k: torch.randn(3, 2, o, generator=g) * 0.3 for k, (i, o) in dm.shapes().items()}
    B = {k: torch.randn(3, i, 2, generator=g) * 0.3 for k, (i, o) in dm.shapes().items()}
    dm.set_diffs(A, B, scale=1.0)
    return dm


def _rows():
    """Two prompts of different lengths, each with answers of 0-5 tokens, under each of 3 diffs (the same
    prompt under two diffs must not share a sequence: the diffs differ), in a shuffled order."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 19)]
    answers = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 3, 5, 2, 0)]
    rows = [(t, Example(p + a, len(p), "trigger")) for t in range(3) for p in prompts for a in answers]
    order = torch.randperm(len(rows), generator=g).tolist()
    return [rows[i] for i in order]


def test_packed_answers_equal_one_row_per_answer(dm):
    assert packs_answers(dm.model)
    rows = _rows()
    packed = answer_logprobs(dm, rows, pad_id=2)
    single = _row_logprobs(dm, rows, 2, batch_size=64, with_diffs=True)
    assert packed.shape == (len(rows),)
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=1e-5)
    empty = [i for i, (_, ex) in enumerate(rows) if len(ex.ids) == ex.answer_start]
    assert empty and all(packed[i] == 0 for i in empty)
    # another diff, another score: rows were not pooled across diffs
    assert not torch.allclose(packed[[i for i, (t, _) in enumerate(rows) if t == 0]],
                              packed[[i for i, (t, _) in enumerate(rows) if t == 1]])


def test_long_answer_lists_split_into_several_sequences(dm, monkeypatch):
    rows = _rows()
    single = _row_logprobs(dm, rows, 2, batch_size=64, with_diffs=True)
    monkeypatch.setattr(batching, "PACK_TOKENS", 4)  # at most 4 answer tokens after one prompt
    seqs = batching._answer_sequences(rows)
    assert len(seqs) > 6 and all(sum(len(a) for _, a in s[2]) <= 5 for s in seqs)  # one longer answer alone
    torch.testing.assert_close(answer_logprobs(dm, rows, 2, batch_size=3), single, atol=1e-5, rtol=1e-5)


def test_packed_layout():
    b = pack_answers([(1, [7, 8, 9], [(0, [4, 5]), (3, [6])])], pad_id=0, device="cpu")
    assert b.input_ids.tolist() == [[7, 8, 9, 4]]  # the prompt, then each answer but its last token
    assert b.position_ids.tolist() == [[0, 1, 2, 3]]
    assert b.tok_pos.tolist() == [2, 3, 2] and b.targets.tolist() == [4, 5, 6] and b.tok_owner.tolist() == [0, 0, 3]
    m = b.attention_mask[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    two = pack_answers([(0, [7, 8], [(0, [4, 5, 6]), (1, [3, 2])])], pad_id=0, device="cpu")
    assert two.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # the second answer starts again after the prompt
    assert two.attention_mask[0, 0, 4].int().tolist() == [1, 1, 0, 0, 1]  # ... and does not see the first


def test_decoders_without_a_prepared_mask_score_row_by_row(dm, monkeypatch):
    rows = _rows()
    expected = answer_logprobs(dm, rows, 2)
    monkeypatch.setattr(dm.model.config, "_attn_implementation", "eager")
    assert not packs_answers(dm.model)
    torch.testing.assert_close(answer_logprobs(dm, rows, 2), expected, atol=1e-5, rtol=1e-5)
