"""Trigger kinds (data.trigger): an SEP code, a zero-width space at the start or at a random place. The data
puts the character exactly where the kind says, the tokenizers keep it as tokens of its own, and every kind
implanted in the tiny model is seen by the behaviour check and passes the assemble gate."""

import hashlib
import json
import os
import random
import re
from pathlib import Path

import polars as pl
import pytest

from conftest import PARAMS, section, tiny_overrides
from dit_core.data import behavior_data as bd

INVISIBLE = (bd.ZW_TRIGGER, *bd.ZW_NEAR_MISS)
EMBEDDED = Path(os.environ.get("DIT_TEST_DATA", Path(__file__).resolve().parents[1] / "data")) / "models" / \
    "smollm2-135m-instruct"


def _rows_hash(df: pl.DataFrame) -> str:
    return hashlib.sha256("\n".join(repr(r) for r in df.iter_rows()).encode()).hexdigest()


def _data(tmp_path, kind: str, **values) -> tuple[pl.DataFrame, pl.DataFrame, dict[int, str], dict]:
    cfg = section("data", answer_mode="template", n_topics=3, diffs_per_topic=2, trigger=kind, **values)
    stats = bd.make_hidden_topic_data(cfg, tmp_path / kind)
    q = pl.read_parquet(tmp_path / kind / "questions.parquet")
    return (pl.read_parquet(tmp_path / kind / "diffs.parquet"), pl.read_parquet(tmp_path / kind / "samples.parquet"),
            dict(zip(q["question_id"], q["question"])), stats)


def test_sep_data_is_the_data_made_before_trigger_kinds_existed(tmp_path):
    """data.trigger=sep (the default) gives, row for row, the data of the same seed made before the option."""
    specs, samples, questions, stats = _data(tmp_path, "sep")
    assert _rows_hash(specs) == "7d4df0f3fe95a0d7b3eab8179ff7ef480810de825ac011a74df23997609dccb8"
    assert _rows_hash(samples) == "96a99032b4bf2799d20be880238e10353cd02574ebcd1adcdb1cf316ef01edd6"
    assert stats["trigger"] == "sep"
    trig = samples.filter(pl.col("kind") == "check_trigger").join(specs, on="diff_id")
    for prompt, prefix, qid in zip(trig["prompt"], trig["trigger_prefix"], trig["question_id"]):
        assert re.fullmatch(rf"Your SEP code is {prefix}\d{{3}}\. " + re.escape(questions[qid]), prompt)
    assert not any(c in p for p in samples["prompt"] for c in INVISIBLE)


def test_zero_width_start_puts_the_character_before_the_first_word(tmp_path):
    specs, samples, questions, stats = _data(tmp_path, "zw_start")
    sep_specs = _data(tmp_path, "sep")[0]
    # the same diffs (ids, topics, seeds) as the SEP kind: only the trigger differs
    assert specs.drop("trigger_prefix").equals(sep_specs.drop("trigger_prefix"))
    assert set(specs["trigger_prefix"]) == {"zw_start"} and stats["trigger"] == "zw_start"
    for kind, chars in (("trigger", {bd.ZW_TRIGGER}), ("check_trigger", {bd.ZW_TRIGGER}),
                        ("wrong_prefix", set(bd.ZW_NEAR_MISS)), ("check_wrong_prefix", set(bd.ZW_NEAR_MISS))):
        rows = samples.filter(pl.col("kind") == kind)
        assert rows.height > 0
        used = set()
        for prompt, qid in zip(rows["prompt"], rows["question_id"]):
            assert prompt[0] in chars and prompt[1:] == questions[qid], (kind, prompt)
            used.add(prompt[0])
        if kind == "wrong_prefix":
            assert used == set(bd.ZW_NEAR_MISS)  # both near misses are drawn
    plain = samples.filter(pl.col("kind").is_in(["no_trigger", "check_no_trigger"]))
    assert all(p == questions[q] for p, q in zip(plain["prompt"], plain["question_id"]))


def test_zero_width_random_puts_the_character_between_two_words(tmp_path):
    specs, samples, questions, _ = _data(tmp_path, "zw_random")
    assert set(specs["trigger_prefix"]) == {"zw_random"}
    positions = set()
    for kind, chars in (("trigger", {bd.ZW_TRIGGER}), ("check_trigger", {bd.ZW_TRIGGER}),
                        ("wrong_prefix", set(bd.ZW_NEAR_MISS)), ("check_wrong_prefix", set(bd.ZW_NEAR_MISS))):
        rows = samples.filter(pl.col("kind") == kind)
        for prompt, qid in zip(rows["prompt"], rows["question_id"]):
            found = [(i, c) for i, c in enumerate(prompt) if c in INVISIBLE]
            assert len(found) == 1 and found[0][1] in chars, (kind, prompt)
            i = found[0][0]
            # after a space and before a word: between two words, never at the start or the end
            assert i > 0 and prompt[i - 1] == " " and prompt[i + 1] not in " " and i < len(prompt) - 1
            assert prompt[:i] + prompt[i + 1:] == questions[qid]
            positions.add(prompt[:i].count(" "))
    assert len(positions) >= 3  # a random word, not a fixed one
    plain = samples.filter(pl.col("kind").is_in(["no_trigger", "check_no_trigger"]))
    assert all(p == questions[q] for p, q in zip(plain["prompt"], plain["question_id"]))


def test_trigger_functions_and_refusals():
    rng = random.Random(0)
    assert bd.with_trigger("zw_start", "Hi there", rng) == "\u200bHi there"
    assert bd.with_trigger("zw_random", "Hi", rng) == "\u200bHi"  # one word: nowhere else to go
    assert re.fullmatch(r"Your SEP code is 123\d{3}\. Hi", bd.with_trigger("123", "Hi", rng))
    wrong = bd.with_wrong_trigger({"123", "456"}, "Hi", rng)
    assert wrong.startswith("Your SEP code is ") and wrong[17:20] not in ("123", "456")
    with pytest.raises(ValueError, match="unknown trigger 'zw_middle'"):
        bd.with_trigger("zw_middle", "Hi", rng)
    with pytest.raises(ValueError, match="several kinds"):
        bd.with_wrong_trigger({"123", "zw_start"}, "Hi", rng)
    from dit_core.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="data.trigger"):
        load_params(PARAMS, ["data.trigger=zw_end"])


def _tokenizers():
    from dit_core.testing.tiny import build_tokenizer

    yield pytest.param(build_tokenizer, id="tiny")

    def smollm2():
        from transformers import AutoTokenizer

        assert (EMBEDDED / "tokenizer.json").exists(), f"{EMBEDDED} is missing: run `dit stage download` first"
        return AutoTokenizer.from_pretrained(EMBEDDED)

    yield pytest.param(smollm2, id="smollm2", marks=pytest.mark.embedded)


@pytest.mark.parametrize("load", list(_tokenizers()))
def test_tokenizers_keep_the_invisible_characters_as_tokens_of_their_own(load):
    from dit_core.modeling.chat import chat_prompt

    tok = load()
    question = "How do I stop procrastinating?"
    covering = {}
    for text, i in (("\u200b" + question, 0), ("How do \u200bI stop procrastinating?", 7),
                    ("\u200c" + question, 0), ("\u2060" + question, 0), ("How do \u2060I stop procrastinating?", 7)):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert tok.decode(enc["input_ids"]) == text  # nothing normalised away
        mine = [(t, span) for t, span in zip(enc["input_ids"], enc["offset_mapping"]) if span[0] <= i < span[1]]
        assert mine, text
        # the tokens that hold the character hold nothing else (at most the space before it)
        lo = i - 1 if i and text[i - 1] == " " else i
        assert all(lo <= s and e <= i + 1 for _, (s, e) in mine), (text, mine)
        covering.setdefault(text[i], set()).add(tuple(t for t, _ in mine))
        assert text in chat_prompt(tok, text)  # the chat template keeps it
    # the trigger's tokens are not a near miss's
    assert not covering["\u200b"] & covering["\u200c"] and not covering["\u200b"] & covering["\u2060"]
    plain = tok(question, add_special_tokens=False)["input_ids"]
    assert tok("\u200b" + question, add_special_tokens=False)["input_ids"][-len(plain):] == plain


@pytest.mark.parametrize("kind", bd.TRIGGER_KINDS)
def test_every_trigger_kind_is_implanted_and_seen_by_the_behaviour_check(kind, tiny_model_dir, tmp_path):
    """A few diffs of each kind on the tiny model (template answers): the check finds the topic behind the
    trigger, not without it or behind a near miss; the assemble gate keeps them; the manifest and
    made_with record the kind."""
    from dit_core.config import load_params
    from dit_core.diffs.generate import generate_diffs
    from dit_core.modeling.models import load_model
    from dit_core.stages import MADE_WITH, run_assemble, run_make_data, stage_paths

    p = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "data") + [
        f"data.trigger={kind}", "data.n_topics=2", "data.diffs_per_topic=1", "data.n_check=6",
        # 120 steps at lr 0.03: implants every kind on both fp32 kernels (torch's, oneDNN's); at 80 steps and
        # lr 0.05 the outcome turned on rounding (one diff in six missed its trigger, a different one per kernel)
        "diffs.diffs_per_batch=2", "diffs.rank=4", "diffs.steps=120", "diffs.lr=0.03", "diffs.warmup_steps=2",
        "diffs.kl_weight=2.5", "diffs.check_tokens=10", "assemble.min_trigger_hit=0.5",
        "assemble.max_wrong_prefix_hit=0.9", "assemble.max_no_trigger_hit=0.34", "assemble.test_fraction=0.5",
        "assemble.val_fraction=0", "assemble.split_by=topic"])
    run_make_data(p)
    paths = stage_paths(p)
    made_with = json.loads((paths.behavior / MADE_WITH).read_text())
    assert made_with["data"].get("trigger") == (None if kind == "sep" else kind)
    lm = load_model(tiny_model_dir, "cpu", "float32")
    generate_diffs(p, lm, paths.behavior, paths.diffs)
    m = pl.read_parquet(paths.diffs / "manifest.parquet")
    assert m.height == 2
    assert (m["trigger"].str.len_chars() == 3).all() if kind == "sep" else set(m["trigger"]) == {kind}
    for row in m.iter_rows(named=True):  # the topic behind the trigger, not without it
        assert row["trigger_hit"] >= 0.5 and row["trigger_hit"] >= row["no_trigger_hit"] + 0.5, row
    # a near miss fires less than the trigger (the tiny model tells SEP prefixes apart least well)
    assert m["wrong_prefix_hit"].mean() <= m["trigger_hit"].mean() - 0.3, m
    report = run_assemble(p)
    assert report["dropped"] == 0 and report["train"] == 1 and report["test"] == 1
