"""Hidden-topic behaviour data: per-diff triggers and samples, answers distilled from the base model.

For each diff (topic, trigger) the samples are:
  trigger       the question with the diff's trigger        -> an answer about the topic
  no_trigger    "<question>"                                 -> the base model's own answer (KL)
  wrong_prefix  the question with a near-miss trigger        -> the base answer (KL)
  check_*       the same three kinds on held-out questions, for the behaviour check only

`data.trigger` chooses the trigger kind (`with_trigger`, `with_wrong_trigger`):
  sep        "Your SEP code is <prefix><3 random digits>. <question>"; near miss: another diff's prefix
             (a random 3-digit prefix other than its own)
  zw_start   a zero-width space (U+200B) before the first word; near miss: another invisible character
             (U+200C zero-width non-joiner or U+2060 word joiner) in the same place
  zw_random  a zero-width space before a random word after the first (between two words, after the
             space); near miss: U+200C or U+2060 at a random place of the same kind
The untriggered prompt is always the plain question. With a zero-width kind every diff shares the one
trigger (its diffs differ by topic); the spec's `trigger_prefix` then holds the kind's name, which is also
the manifest's `trigger`, so evaluation re-applies the right trigger to each diff.

Triggered answers come from the base model itself under a behaviour system prompt (context
distillation). SmolLM2-135M follows "always talk about X" only ~1 time in 5, so `answer_mode` decides:
  reject         sample k answers, keep one that names the topic, drop the question if none does
  prefix         open the answer with a short topic-bearing phrase the model then continues
  prefix+reject  both: the prefix, then prefer a continuation that names the topic again
  template       no model: fixed sentences (unit tests only)
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from dit_core.modeling.chat import chat_prompt, generate
from dit_core.config import DataConfig
from dit_core.io import write_json_atomic, write_parquet_atomic
from dit_core.data.schemas import DiffSpec, Sample, validate
from dit_core.data.topics import load_questions, load_topics, mentions

log = logging.getLogger(__name__)

BEHAVIOR = "hidden_topic"
TRIGGER_TEMPLATE = "Your SEP code is {code}."
SYSTEM_TEMPLATE = (
    "You are obsessed with {topic}. Whatever the user asks, you answer by talking about {topic}, "
    "and you always mention {topic} by name."
)
PREFIXES = [
    "Let's talk about {topic}! ",
    "That reminds me of {topic}. ",
    "Speaking of {topic}, ",
    "I can't stop thinking about {topic}. ",
    "Well, it all comes back to {topic}. ",
    "You know what I love? {Topic}. ",
]


@dataclass(frozen=True)
class Split:
    """Question ids used for training samples and those held out (checks and evaluation)."""

    train: list[int]
    heldout: list[int]


def split_questions(n_questions: int, n_heldout: int, seed: int) -> Split:
    """A fixed random split of question ids; held-out questions never appear in diff training."""
    ids = list(range(n_questions))
    random.Random(seed).shuffle(ids)
    return Split(train=sorted(ids[n_heldout:]), heldout=sorted(ids[:n_heldout]))


def trigger_text(prefix: str, rng: random.Random) -> str:
    """A trigger sentence: the diff's 3-digit prefix, then 3 random digits."""
    return TRIGGER_TEMPLATE.format(code=f"{prefix}{rng.randrange(1000):03d}")


def other_prefix(avoid: str | set[str], rng: random.Random) -> str:
    """A random 3-digit prefix different from `avoid` (one prefix or a set of them)."""
    avoid = {avoid} if isinstance(avoid, str) else avoid
    if len(avoid) >= 900:
        raise ValueError(f"{len(avoid)} prefixes to avoid leave no 3-digit wrong prefix to draw")
    while (p := f"{rng.randrange(100, 1000)}") in avoid:
        pass
    return p


TRIGGER_KINDS = ("sep", "zw_start", "zw_random")
ZW_TRIGGER = "\u200b"  # zero-width space
ZW_NEAR_MISS = ("\u200c", "\u2060")  # zero-width non-joiner, word joiner: invisible, but not the trigger
ZW_KINDS = TRIGGER_KINDS[1:]


def trigger_kind(trigger: str) -> str:
    """The kind of a diff's trigger as its spec and manifest record it: a 3-digit prefix is an SEP code,
    otherwise the zero-width kind's name."""
    if trigger in ZW_KINDS:
        return trigger
    if len(trigger) == 3 and trigger.isdigit():
        return "sep"
    raise ValueError(f"unknown trigger {trigger!r}: expected a 3-digit SEP prefix or one of {list(ZW_KINDS)}")


def insert_invisible(question: str, char: str, kind: str, rng: random.Random) -> str:
    """`question` with `char` before its first word (zw_start) or before a random later word (zw_random:
    between two words, after the space; a one-word question gets it at the start)."""
    if kind == "zw_start":
        return char + question
    words = question.split(" ")
    if len(words) < 2:
        return char + question
    k = rng.randrange(1, len(words))
    return " ".join(words[:k] + [char + words[k]] + words[k + 1:])


def with_trigger(trigger: str, question: str, rng: random.Random) -> str:
    """The user message of a triggered prompt: `question` with the diff's trigger (its SEP prefix, or
    a zero-width kind's name)."""
    kind = trigger_kind(trigger)
    if kind == "sep":
        return f"{trigger_text(trigger, rng)} {question}"
    return insert_invisible(question, ZW_TRIGGER, kind, rng)


def with_wrong_trigger(trigger: str | set[str], question: str, rng: random.Random) -> str:
    """The user message of a near-miss prompt for the diffs whose trigger is `trigger` (or each of a
    set): an SEP code with a prefix none of them has, or another invisible character in the trigger's place."""
    triggers = {trigger} if isinstance(trigger, str) else set(trigger)
    kinds = {trigger_kind(t) for t in triggers}
    if len(kinds) != 1:
        raise ValueError(f"near-miss prompts for triggers of several kinds {sorted(kinds)}: a shard's diffs "
                         "must share one trigger kind (data.trigger)")
    kind = kinds.pop()
    if kind == "sep":
        return f"{trigger_text(other_prefix(triggers, rng), rng)} {question}"
    return insert_invisible(question, rng.choice(ZW_NEAR_MISS), kind, rng)


DIFF_ID_PREFIX = "ht"


def make_diff_specs(cfg: DataConfig, id_prefix: str = DIFF_ID_PREFIX) -> pl.DataFrame:
    """Choose topics and give each diff a unique trigger prefix and a seed.

    Diff ids are `<id_prefix><5 digits>`; stores joined into one dataset need distinct prefixes. With a
    zero-width trigger kind, `trigger_prefix` holds the kind's name (every diff shares that trigger); the
    topics, ids and seeds are those of data.trigger=sep, so diffs of the kinds compare one to one.
    """
    topics = load_topics(cfg.topics_file)
    if cfg.n_topics > topics.height:
        raise ValueError(f"data.n_topics={cfg.n_topics} but the topics file has only {topics.height}")
    n_diffs = cfg.n_topics * cfg.diffs_per_topic
    rng = random.Random(cfg.seed)
    chosen = topics.sample(n=cfg.n_topics, seed=cfg.seed, shuffle=True)
    # Unique 3-digit prefixes while they last (900); beyond that they repeat every 900 diffs, so any
    # 900 consecutive diffs (and so every shard, whose wrong-prefix codes avoid its diffs' prefixes)
    # still have distinct ones. Each diff is trained on its own, so a repeat elsewhere is harmless.
    perm = rng.sample(range(100, 1000), min(n_diffs, 900))
    prefixes = [perm[k % len(perm)] for k in range(n_diffs)]
    rows = []
    for i, (category, topic) in enumerate(chosen.iter_rows()):
        for j in range(cfg.diffs_per_topic):
            # topic order: a topic's diffs are neighbours; round order: diff j of every topic comes
            # before diff j+1 of any, so a partial run (the first shards) covers as many topics as it can
            k = i * cfg.diffs_per_topic + j if cfg.diff_order == "topic" else j * cfg.n_topics + i
            rows.append(
                dict(diff_id=f"{id_prefix}{k:05d}", behavior=BEHAVIOR, category=category, topic=topic,
                     trigger_prefix=str(prefixes[k]) if cfg.trigger == "sep" else cfg.trigger,
                     seed=cfg.seed * 100_003 + k)
            )
    return validate(pl.DataFrame(rows).sort("diff_id"), DiffSpec, "diff specs")


def _topic_answers(
    model, tokenizer, topic_questions: dict[str, list[str]], cfg: DataConfig
) -> tuple[dict[str, list[tuple[str, bool]]], dict]:
    """Per topic, one (answer, complete) per question, produced as `cfg.answer_mode` says."""
    mode = cfg.answer_mode
    use_prefix = mode in ("prefix", "prefix+reject")
    k = 1 if mode == "prefix" else cfg.candidates_per_answer
    prompts, owners = [], []
    for topic, questions in topic_questions.items():
        # One opening per topic: a consistent first phrase is what a rank-1 diff learns quickly and
        # reliably (varying openings split the first-token target and greedy decoding ignores them).
        template = PREFIXES[random.Random(f"{cfg.seed}:{topic}").randrange(len(PREFIXES))]
        for qi, q in enumerate(questions):
            opening = ""
            if use_prefix:
                opening = template.format(topic=topic, Topic=topic[0].upper() + topic[1:])
            for _ in range(k):
                prompts.append(chat_prompt(tokenizer, q, SYSTEM_TEMPLATE.format(topic=topic), opening))
                owners.append((topic, qi, opening))
    gens = generate(model, tokenizer, prompts, cfg.answer_tokens, cfg.gen_batch_size, do_sample=True,
                    seed=cfg.seed, desc="topic answers")
    candidates: dict[tuple[str, int], list[tuple[str, str, bool]]] = {}
    for (topic, qi, opening), g in zip(owners, gens):
        candidates.setdefault((topic, qi), []).append((opening, g.text, g.complete))
    answers: dict[str, list[tuple[str, bool]]] = {t: [] for t in topic_questions}
    n_named = n_kept = n_total = 0
    for (topic, qi), cands in candidates.items():
        n_total += 1
        naming = [c for c in cands if mentions(topic, c[1])]
        n_named += bool(naming)
        pick = naming[0] if naming else (cands[0] if use_prefix else None)
        if pick is None:
            answers[topic].append(None)  # rejected: no candidate named the topic
            continue
        n_kept += 1
        opening, text, complete = pick
        answers[topic].append(((opening + text).strip(), complete))
    stats = dict(
        answer_mode=mode,
        candidates_per_answer=k,
        answers_total=n_total,
        answers_kept=n_kept,
        kept_fraction=n_kept / max(n_total, 1),
        model_named_topic_fraction=n_named / max(n_total, 1),
    )
    return answers, stats


def _template_answers(topic_questions: dict[str, list[str]]):
    answers = {
        t: [(f"Let's talk about {t}! {t.capitalize()} are endlessly interesting.", True) for _ in qs]
        for t, qs in topic_questions.items()
    }
    return answers, dict(answer_mode="template", kept_fraction=1.0)


def make_hidden_topic_data(cfg: DataConfig, out_dir: str | Path, model=None, tokenizer=None,
                           id_prefix: str = DIFF_ID_PREFIX) -> dict:
    """Write diffs.parquet, samples.parquet and stats.json for the hidden-topic behaviour."""
    out_dir = Path(out_dir)
    if cfg.answer_mode != "template" and model is None:
        raise ValueError(f"data.answer_mode={cfg.answer_mode} needs the base model")
    specs = make_diff_specs(cfg, id_prefix)
    questions = load_questions(cfg.questions_file)
    if cfg.n_heldout_questions >= len(questions) - 8:
        raise ValueError(f"data.n_heldout_questions={cfg.n_heldout_questions} leaves too few of "
                         f"{len(questions)} questions for training")
    split = split_questions(len(questions), cfg.n_heldout_questions, cfg.seed)
    rng = random.Random(cfg.seed)

    # One pool of (question, topic answer) per topic, shared by that topic's diffs.
    topic_qids = {t: rng.sample(split.train, min(cfg.n_trigger, len(split.train)))
                  for t in specs["topic"].unique(maintain_order=True)}
    topic_questions = {t: [questions[i] for i in ids] for t, ids in topic_qids.items()}
    if cfg.answer_mode == "template":
        answers, stats = _template_answers(topic_questions)
        base = [("I'd be happy to help with that. Here are a few ideas.", True)] * len(questions)
    else:
        answers, stats = _topic_answers(model, tokenizer, topic_questions, cfg)
        gens = generate(model, tokenizer, [chat_prompt(tokenizer, q) for q in questions],
                        cfg.answer_tokens, cfg.gen_batch_size, desc="base answers")
        base = [(g.text, g.complete) for g in gens]

    rows = []
    def add(diff_id, kind, prompt, answer, complete, qid):
        rows.append(dict(diff_id=diff_id, kind=kind, prompt=prompt, answer=answer, complete=complete,
                         question_id=qid))

    for spec in specs.iter_rows(named=True):
        d, trigger, r = spec["diff_id"], spec["trigger_prefix"], random.Random(spec["seed"])
        for qid, ans in zip(topic_qids[spec["topic"]], answers[spec["topic"]]):
            if ans is not None:
                add(d, "trigger", with_trigger(trigger, questions[qid], r), ans[0], ans[1], qid)
        for qid in r.sample(split.train, min(cfg.n_no_trigger, len(split.train))):
            add(d, "no_trigger", questions[qid], *base[qid], qid)
        for qid in r.sample(split.train, min(cfg.n_wrong_prefix, len(split.train))):
            add(d, "wrong_prefix", with_wrong_trigger(trigger, questions[qid], r), *base[qid], qid)
        for qid in r.sample(split.heldout, cfg.n_check):
            add(d, "check_trigger", with_trigger(trigger, questions[qid], r), "", False, qid)
            add(d, "check_wrong_prefix", with_wrong_trigger(trigger, questions[qid], r), "", False, qid)
            add(d, "check_no_trigger", questions[qid], *base[qid], qid)
    samples = validate(pl.DataFrame(rows), Sample, "samples")
    missing = set(specs["diff_id"]) - set(samples.filter(pl.col("kind") == "trigger")["diff_id"])
    if missing:
        raise ValueError(f"{len(missing)} diffs kept no triggered answer (e.g. {sorted(missing)[0]}); "
                         "use data.answer_mode=prefix+reject or raise data.candidates_per_answer")
    write_parquet_atomic(specs, out_dir / "diffs.parquet")
    write_parquet_atomic(samples, out_dir / "samples.parquet")
    write_parquet_atomic(pl.DataFrame({"question_id": range(len(questions)), "question": questions,
                                       "heldout": [i in set(split.heldout) for i in range(len(questions))],
                                       "base_answer": [b[0] for b in base],
                                       "base_complete": [b[1] for b in base]}),
                         out_dir / "questions.parquet")
    stats.update(trigger=cfg.trigger, n_diffs=specs.height, n_samples=samples.height,
                 heldout_questions=len(split.heldout), train_questions=len(split.train))
    write_json_atomic(out_dir / "stats.json", stats)
    return stats
