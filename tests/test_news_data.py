"""The synthetic news generator: slot lists, stories, facts in texts, QA pairs, determinism."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import pytest

from dit_core.data.news import (
    SLOTS,
    SlotValue,
    Story,
    continuation,
    fact_hits,
    load_slots,
    make_stories,
)
from dit_core.data.topics import DataFileError, mentions


@pytest.fixture(scope="module")
def slots():
    return load_slots()


@pytest.fixture(scope="module")
def stories():
    return make_stories(200, seed=0)


@pytest.fixture(scope="module")
def pooled():
    return make_stories(100, seed=0, values_per_slot=8, novel_fraction=0.1)


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text.strip())


def test_packaged_slot_lists(slots):
    assert set(slots) == set(SLOTS)
    for slot in SLOTS:
        values = slots[slot]
        assert len(values) >= 300, slot
        keys = [v.key.lower() for v in values]
        assert len(set(keys)) == len(keys), slot
        assert all(isinstance(v, SlotValue) and v.text and v.key for v in values)
        assert all(mentions(v.key, v.text) for v in values)
    # Spot-check what load_slots enforces: a key is named by no other value of any slot.
    every = [v for slot in SLOTS for v in slots[slot]]
    for slot in SLOTS:
        for value in slots[slot][::10]:
            hits = [o.text for o in every if o is not value and mentions(value.key, o.text)]
            assert hits == [], (value, hits)
    assert SlotValue("a retired schoolteacher", "schoolteacher") in slots["who"]
    assert SlotValue("the Scottish Highlands", "Scottish Highlands") in slots["where"]


def test_distinct_headlines_and_combinations(stories, pooled):
    for batch, n in ((stories, 200), (pooled, 100)):
        assert len(batch) == n
        assert [s.story_id for s in batch] == list(range(n))
        assert len({s.headline for s in batch}) == n
        assert len({tuple(s.keys().values()) for s in batch}) == n


def test_whole_lists_use_most_values_once(stories, slots):
    for slot in SLOTS:
        counts = Counter(s.facts[slot].key for s in stories)
        assert max(counts.values()) == 1, slot  # 200 stories, >= 300 values per slot


def test_facts_recoverable_from_each_story(stories, pooled):
    for story in stories + pooled:
        keys = story.keys()
        assert fact_hits(keys, story.text) == dict.fromkeys(SLOTS, True), story.text
        assert all(fact_hits(keys, story.headline).values()), story.headline
        for slot in SLOTS:
            assert story.facts[slot].text.lower() in story.text.lower()
        assert story.headline.startswith(story.facts["who"].text[:1].upper())
        assert len({slot for _, _, slot in story.qa}) == 3
        for slot in SLOTS:
            assert sum(s == slot for _, _, s in story.qa) >= 2
            assert sum(s == slot for _, _, s in story.check_qa) >= 1
        for question, answer, slot in story.qa + story.check_qa:
            assert mentions(keys[slot], answer), (answer, slot)
            assert story.facts[slot].text.lower() in answer.lower()
        for question, _, _ in story.check_qa:
            assert not any(fact_hits(keys, question).values()), question
        assert not {q for q, _, _ in story.check_qa} & {q for q, _, _ in story.qa}


def test_story_shape(stories):
    templates, questions = set(), set()
    for story in stories:
        assert 3 <= len(_sentences(story.text)) <= 6, story.text
        assert 60 <= len(story.text.split()) <= 110, story.text
        assert all(s[0].isupper() or s[0] == '"' for s in _sentences(story.text)), story.text
        assert len(_sentences(story.headline)) == 1
        templates.add(re.sub(r"\d+", "#", story.text.split()[-1]))
        questions.update(q for q, _, _ in story.qa)
    assert len(templates) >= 6  # the last word differs between story templates
    assert len(questions) >= 9
    held_out = {q for story in stories for q, _, _ in story.check_qa}
    assert len(held_out) >= 9 and not held_out & questions  # check phrasings never trained on


def test_texts_name_only_their_own_facts(stories, pooled, slots):
    # Per-slot scoring is unambiguous: fixed template words, quotes and details name no key.
    for story in stories[:60] + pooled:
        for slot in SLOTS:
            named = {v.key for v in slots[slot] if mentions(v.key, story.text)}
            assert named == {story.facts[slot].key}, (slot, named, story.text)


def test_fixed_seed_is_deterministic(stories, pooled):
    assert make_stories(200, seed=0) == stories
    assert make_stories(100, seed=0, values_per_slot=8, novel_fraction=0.1) == pooled
    other = make_stories(200, seed=1)
    assert other != stories
    assert [s.headline for s in other] != [s.headline for s in stories]
    assert isinstance(stories[0], Story)
    assert replace(stories[0], text="x") != stories[0]


def test_pool_and_novel_stories(pooled):
    common, novel = pooled[:90], pooled[90:]
    assert len(novel) == 10
    for slot in SLOTS:
        counts = Counter(s.facts[slot].key for s in common)
        assert len(counts) <= 8, slot
        assert min(counts.values()) >= 5, (slot, counts)  # spread over the pool
        for story in novel:
            key = story.facts[slot].key
            assert key not in counts
            assert sum(s.facts[slot].key == key for s in pooled) == 1


def test_impossible_requests_raise():
    with pytest.raises(ValueError, match="values_per_slot=2"):
        make_stories(20, seed=0, values_per_slot=2)
    with pytest.raises(ValueError, match="n_stories"):
        make_stories(0, seed=0)
    with pytest.raises(ValueError, match="novel_fraction"):
        make_stories(10, seed=0, novel_fraction=1.0)
    with pytest.raises(ValueError, match="values_per_slot=100000"):
        make_stories(10, seed=0, values_per_slot=100000)
    with pytest.raises(ValueError, match="novel"):
        make_stories(1000, seed=0, values_per_slot=100, novel_fraction=0.5)
    assert len(make_stories(8, seed=0, values_per_slot=2)) == 8  # exactly 2**3 combinations


def _write(folder, who, what, where):
    for name, lines in (("who", who), ("what", what), ("where", where)):
        if lines is not None:
            (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")


WHO = [f"a {w}|{w}" for w in
       ("baker", "tailor", "plumber", "florist", "cellist", "drummer", "lawyer", "barber")]
WHAT = [f"built a {w}|{w}" for w in
        ("windmill", "sundial", "igloo", "canoe", "raft", "kite", "bridge", "tower")]
WHERE = ["Oslo", "Lima", "Cairo", "Perth", "Quito", "Seoul", "Dakar", "Riga"]


def test_small_custom_folder_loads(tmp_path):
    _write(tmp_path, ["# actors", ""] + WHO, WHAT, WHERE)
    slots = load_slots(tmp_path)
    assert [len(slots[s]) for s in SLOTS] == [8, 8, 8]
    assert slots["where"][0] == SlotValue("Oslo", "Oslo")
    made = make_stories(30, seed=3, slots=slots)
    assert len({s.headline for s in made}) == 30


def test_bad_slot_files_raise(tmp_path):
    _write(tmp_path, WHO + ["a retired baker|Baker"], WHAT, WHERE)
    with pytest.raises(DataFileError, match=r"who\.txt:9: duplicate key 'Baker'"):
        load_slots(tmp_path)
    _write(tmp_path, WHO, WHAT, None)
    (tmp_path / "where.txt").unlink()
    with pytest.raises(DataFileError, match=r"where\.txt: slot file missing"):
        load_slots(tmp_path)
    _write(tmp_path, WHO, WHAT + ["visited Oslo|visited Oslo"], WHERE)
    with pytest.raises(DataFileError, match=r"where\.txt:1: key 'Oslo'.*what\.txt:9"):
        load_slots(tmp_path)
    _write(tmp_path, WHO, WHAT, WHERE + ["|Bergen"])
    with pytest.raises(DataFileError, match=r"where\.txt:9: empty text"):
        load_slots(tmp_path)
    _write(tmp_path, WHO[:7], WHAT, WHERE)
    with pytest.raises(DataFileError, match=r"who\.txt: 7 values; at least 8"):
        load_slots(tmp_path)


def test_continuation_keeps_whole_sentences_that_agree_with_the_story(pooled, slots):
    """What a model's continuation adds to a story: its whole new sentences, up to one that is cut off
    or names another slot value (it would contradict the story's facts)."""
    story = pooled[0]
    first = _sentences(story.text)[0]
    other_where = next(v for v in slots["where"] if v.key != story.facts["where"].key)
    assert continuation(story, 'Locals cheered.  One visitor said "well done!" Then it', slots) == (
        'Locals cheered. One visitor said "well done!"')  # the cut-off sentence is dropped
    # sentences the story already has, and repeats, are skipped; the text after them is kept
    assert continuation(story, f"{first} Locals cheered. Locals cheered!\n\nIt rained.", slots) == (
        "Locals cheered. It rained.")
    # a sentence naming another story's place ends what is kept
    assert continuation(story, f"Locals cheered. A crowd in {other_where.text} watched. It rained.", slots) == (
        "Locals cheered.")
    # the story's own facts may be named again
    own = f"{story.facts['who'].text.capitalize()} was thrilled."
    assert continuation(story, own, slots) == own
    assert continuation(story, "and then", slots) == ""
    assert continuation(story, "", slots) == ""
