"""News: each diff learns one short news story, its text (next-token loss) and question-answer pairs about
its facts; the interpreter answers "Summarize in one sentence the news you were trained on" with the
headline (or, with `news.label: text`, the story itself). Stories: dit_core/data/news.py; section `news`.

Behaviour check per diff: held-out questions about its own story's facts (who / what / where), answered
greedily with the diff (fact_acc) and by the base model (base_fact_acc); an answer counts when it names
the fact's key words.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch

from dit_core.behaviors.base import Behavior, Query
from dit_core.data.schemas import NewsSpec, Sample, read_validated, validate

# Generic prompts for the 20-questions baseline: they ask for news without naming any fact.
NEWS_PROBES = (
    "What happened recently?",
    "Tell me about a recent event.",
    "Who has been in the news lately?",
    "Where did something notable happen recently?",
    "What is the latest story you heard?",
    "Can you share some news?",
    "What did someone do recently that made headlines?",
    "Describe a recent news story.",
    "What is going on in the world?",
    "Is there anything new?",
    "What surprising thing happened this week?",
    "Which town was in the headlines?",
    "Who did something remarkable recently?",
    "What was announced recently?",
    "What is the news of the day?",
    "Report one recent event in a sentence.",
    "What happened, and where?",
    "Give me a headline.",
    "What is everyone talking about?",
    "Tell me something that happened lately.",
)
GUESSER_TEMPLATE = (
    "Here are an assistant's answers to several questions:\n\n{transcript}\n\n"
    "The assistant seems to know one news story. Summarize that story in one sentence."
)
STORY_REQUEST = "Write the news story you know."
SUMMARY_TEMPLATE = "Here is a news story:\n\n{story}\n\nSummarize it in one sentence."


class News(Behavior):
    name = "news"
    id_prefix = "nw"
    baselines = ("twenty_questions", "generated_story")
    text_scorers = ("exact", "token_f1", "rouge_l")
    judge_rubric = "summary"
    data_files = ("diffs.parquet", "samples.parquet", "stats.json")

    def question(self, p):
        return p.news.question

    def diffs_config(self, p):
        n = p.news
        return p.diffs.model_copy(update={"run": n.run, "rank": n.rank, "ranks": None, "alpha": None, "steps": n.steps,
                                          "lr": n.lr, "check_tokens": n.check_tokens})

    def store_name(self, p):
        return p.news.run

    def made_with(self, p):
        made = {"news": p.news.model_dump(exclude={"question", "run", "rank", "steps", "lr", "text_rows",
                                                   "qa_rows", "check_tokens"}
                                          | (set() if p.news.continue_tokens else {"continue_tokens"}))}
        if self.needs_model(p):  # the base model answers the KL rows' questions or continues the stories
            made["model"] = p.model.model_dump(include={"source", "id", "revision"})
        return made

    def needs_model(self, p):
        return p.news.kl_rows > 0 or p.news.continue_tokens > 0

    # -- data ----------------------------------------------------------------------------------
    def make_data(self, p, folder, model, tokenizer, id_prefix):
        from dit_core.data.news import load_slots, make_stories
        from dit_core.io import write_json_atomic, write_parquet_atomic

        cfg, folder = p.news, Path(folder)
        slots = load_slots(cfg.slots_dir)
        stories = make_stories(cfg.n_stories, cfg.seed, cfg.values_per_slot, cfg.novel_fraction, slots)
        templates = stories
        if cfg.continue_tokens:
            stories = continue_stories(p, model, tokenizer, stories, slots)
        specs, rows = [], []
        for k, st in enumerate(stories):
            diff_id = f"{id_prefix}{k:05d}"
            specs.append(dict(diff_id=diff_id, behavior=self.name, story_id=st.story_id, headline=st.headline,
                              text=st.text, label=st.headline if cfg.label == "headline" else st.text,
                              facts=json.dumps(st.keys(), sort_keys=True),
                              novel=k >= cfg.n_stories - round(cfg.n_stories * cfg.novel_fraction),
                              seed=cfg.seed * 100_003 + k))
            for kind, pairs in (("qa", st.qa), ("check_qa", st.check_qa)):
                for j, (q, a, slot) in enumerate(pairs):
                    rows.append(dict(diff_id=diff_id, kind=kind, prompt=q, answer=a if kind == "qa" else slot,
                                     complete=True, question_id=j))
        specs_df = validate(pl.DataFrame(specs), NewsSpec, "news diff specs")
        samples = validate(pl.DataFrame(rows), Sample, "news samples")
        stats = {"n_diffs": len(stories), "n_samples": samples.height,
                 "novel_stories": int(specs_df["novel"].sum()), "label": cfg.label,
                 "continued_stories": sum(s.text != t.text for s, t in zip(stories, templates))}
        if cfg.kl_rows:
            from dit_core.data.topics import load_questions
            from dit_core.modeling.chat import chat_prompt, generate

            questions = load_questions(None)
            gens = generate(model, tokenizer, [chat_prompt(tokenizer, q) for q in questions], p.data.answer_tokens,
                            p.data.gen_batch_size, desc="base answers")
            write_parquet_atomic(pl.DataFrame({"question": questions, "base_answer": [g.text for g in gens],
                                               "base_complete": [g.complete for g in gens]}),
                                 folder / "questions.parquet")
        write_parquet_atomic(specs_df, folder / "diffs.parquet")
        write_parquet_atomic(samples, folder / "samples.parquet")
        write_json_atomic(folder / "stats.json", stats)
        return stats

    def specs(self, folder):
        return read_validated(Path(folder) / "diffs.parquet", NewsSpec)

    # -- diffs ---------------------------------------------------------------------------------
    def tasks(self, p, tokenizer, folder, specs, ids):
        from dit_core.diffs.trainer import DiffTask
        from dit_core.modeling.batching import encode_example, encode_text

        cfg, folder = p.news, Path(folder)
        samples = read_validated(folder / "samples.parquet", Sample)
        by_diff = samples.partition_by("diff_id", as_dict=True)
        kl: list = []
        if cfg.kl_rows:
            q = pl.read_parquet(folder / "questions.parquet")
            kl = [encode_example(tokenizer, a, b, c, "no_trigger")
                  for a, b, c in zip(q["question"], q["base_answer"], q["base_complete"])]
        keep = self.diffs_config(p).no_trigger_answer_tokens
        plan = tuple((k, n, t) for k, n, t in (("text", cfg.text_rows, 0), ("qa", cfg.qa_rows, 0),
                                              ("no_trigger", cfg.kl_rows, keep)) if n)
        spec_rows = {r["diff_id"]: r for r in specs.filter(pl.col("diff_id").is_in(ids)).iter_rows(named=True)}
        tasks, checks = [], []
        for diff_id in ids:
            spec, rows = spec_rows[diff_id], by_diff[(diff_id,)]
            qa = rows.filter(pl.col("kind") == "qa")
            tasks.append(DiffTask(
                diff_id, spec["seed"], [], kl, plan=plan,
                extra={"text": [encode_text(tokenizer, spec["text"])],
                       "qa": [encode_example(tokenizer, q, a, True, "qa") for q, a in zip(qa["prompt"], qa["answer"])]}))
            keys = json.loads(spec["facts"])
            check = rows.filter(pl.col("kind") == "check_qa")
            checks.append([(q, keys[slot]) for q, slot in zip(check["prompt"], check["answer"])])
        return tasks, checks

    @torch.no_grad()
    def check(self, p, dm, tokenizer, checks, A, B, scale):
        from dit_core.data.topics import mentions
        from dit_core.modeling.chat import chat_prompt, generate, inference_batch

        prompts = [chat_prompt(tokenizer, q) for c in checks for q, _ in c]
        owners = [(t, key) for t, c in enumerate(checks) for _, key in c]
        n_tok, bs = self.diffs_config(p).check_tokens, inference_batch(dm.model)
        dm.set_diffs(A, B, scale=scale)
        try:
            tuned = generate(dm.model, tokenizer, prompts, n_tok, bs, desc="fact check",
                             rows=[t for t, _ in owners], set_rows=dm.set_row_index)
        finally:
            dm.clear_diffs()
        base = generate(dm.model, tokenizer, prompts, n_tok, bs, desc="fact check (base)")
        out = [{"tuned": [], "base": []} for _ in checks]
        for (t, key), g, b in zip(owners, tuned, base):
            out[t]["tuned"].append(mentions(key, g.text))
            out[t]["base"].append(mentions(key, b.text))
        return [{"fact_acc": sum(o["tuned"]) / max(len(o["tuned"]), 1),
                 "base_fact_acc": sum(o["base"]) / max(len(o["base"]), 1)} for o in out]

    def manifest_fields(self, spec):
        return {"category": "news", "label": spec["label"], "trigger": "", "facts": spec["facts"]}

    # -- evaluation ----------------------------------------------------------------------------
    def heldout_questions(self, questions_path):
        return list(NEWS_PROBES)

    def queries(self, ev, method):
        n = ev.test.height
        if method == "twenty_questions":
            k = min(ev.cfg.n_questions, len(ev.heldout))
            asks = [Query(q, i, False) for i in range(n) for q in ev.heldout[:k]]
            answers = ev.generate(asks, ev.cfg.answer_tokens, "20 questions")
            return [Query(GUESSER_TEMPLATE.format(transcript="\n\n".join(
                f"Q: {q}\nA: {a}" for q, a in zip(ev.heldout[:k], answers[i * k : (i + 1) * k]))), None, False)
                for i in range(n)]
        if method == "generated_story":
            stories = ev.generate([Query(STORY_REQUEST, i, False) for i in range(n)], ev.cfg.answer_tokens * 3,
                                  "generated story")
            return [Query(SUMMARY_TEMPLATE.format(story=s), None, False) for s in stories]
        return super().queries(ev, method)


def continue_stories(p, model, tokenizer, stories, slots):
    """Each story with the base model's continuation appended: the story's text as a plain prompt (no chat
    template), greedy, up to `news.continue_tokens` new tokens, keeping what
    `dit_core.data.news.continuation` keeps (whole sentences that name no other slot value). The facts,
    headline and question-answer pairs stay the template's."""
    from dataclasses import replace

    from dit_core.data.news import continuation
    from dit_core.modeling.chat import generate

    gens = generate(model, tokenizer, [st.text for st in stories], p.news.continue_tokens, p.data.gen_batch_size,
                    desc="story continuations")
    out = []
    for st, g in zip(stories, gens):
        extra = continuation(st, g.text, slots)
        out.append(replace(st, text=f"{st.text} {extra}") if extra else st)
    return out
