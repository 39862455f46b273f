"""Hidden topic behind a trigger: the diff makes the model talk about a topic whenever the prompt carries
its trigger, and only then: an SEP code (`Your SEP code is <prefix><3 digits>.`) or a zero-width space at
the start or at a random place (`data.trigger`). Data: dit_core/data/behavior_data.py (section `data`);
check: dit_core/diffs/behavior_check.py; recipe: the `diffs` section.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from dit_core.behaviors.base import Behavior, Query
from dit_core.data import behavior_data as bd
from dit_core.data.schemas import DiffSpec, Sample, read_validated

GUESSER_TEMPLATE = (
    "Here are an assistant's answers to several unrelated questions:\n\n{transcript}\n\n"
    "The assistant keeps steering towards one topic. What is that topic? Answer with the topic only."
)


class HiddenTopic(Behavior):
    name = bd.BEHAVIOR
    id_prefix = bd.DIFF_ID_PREFIX
    baselines = ("base_question_trigger", "twenty_questions", "twenty_questions_trigger")
    data_files = ("diffs.parquet", "samples.parquet", "questions.parquet", "stats.json")

    def question(self, p):
        return p.interpreter.question

    def store_name(self, p):
        return p.diffs.run

    def made_with(self, p):
        data = p.data.model_dump()
        if data["diff_order"] == "topic":  # the order before the option existed: old records stay valid
            del data["diff_order"]
        if data["trigger"] == "sep":  # likewise the trigger kind
            del data["trigger"]
        return {"data": data, "model": p.model.model_dump(include={"source", "id", "revision"})}

    def needs_model(self, p):
        return p.data.answer_mode != "template"

    def make_data(self, p, folder, model, tokenizer, id_prefix):
        return bd.make_hidden_topic_data(p.data, folder, model, tokenizer, id_prefix=id_prefix)

    def specs(self, folder):
        return read_validated(Path(folder) / "diffs.parquet", DiffSpec)

    def tasks(self, p, tokenizer, folder, specs, ids):
        from dit_core.diffs.behavior_check import CheckSet
        from dit_core.diffs.trainer import TriggeredDiffTask
        from dit_core.modeling.batching import encode_example

        folder = Path(folder)
        samples = read_validated(folder / "samples.parquet", Sample)
        questions = pl.read_parquet(folder / "questions.parquet")
        by_diff = samples.partition_by("diff_id", as_dict=True)
        train_q = questions.filter(~pl.col("heldout"))
        base_pairs = list(zip(train_q["question"], train_q["base_answer"], train_q["base_complete"]))
        q_text = dict(zip(questions["question_id"], questions["question"]))
        spec_rows = {r["diff_id"]: r for r in specs.filter(pl.col("diff_id").is_in(ids)).iter_rows(named=True)}
        tasks, checks = [], []
        for diff_id in ids:
            spec, rows = spec_rows[diff_id], by_diff[(diff_id,)]

            def prompts(kind):
                return rows.filter(pl.col("kind") == kind)["prompt"].to_list()

            trig = rows.filter(pl.col("kind") == "trigger")
            tasks.append(TriggeredDiffTask(
                diff_id, spec["seed"], [], [], tokenizer=tokenizer, prefix=spec["trigger_prefix"],
                trigger_pairs=[(q_text[q], a, c) for q, a, c in
                               zip(trig["question_id"], trig["answer"], trig["complete"])],
                base_pairs=base_pairs))
            checks.append(CheckSet(
                spec["topic"], prompts("check_trigger"), prompts("check_wrong_prefix"), prompts("check_no_trigger"),
                [encode_example(tokenizer, r["prompt"], r["answer"], r["complete"], "no_trigger")
                 for r in rows.filter(pl.col("kind") == "check_no_trigger").iter_rows(named=True)]))
        return tasks, checks

    def check(self, p, dm, tokenizer, checks, A, B, scale):
        from dit_core.diffs.behavior_check import check_diffs

        cfg = self.diffs_config(p)
        return check_diffs(dm, tokenizer, checks, A, B, scale, cfg.check_tokens, max_batch_tokens=cfg.max_batch_tokens,
                           share_prefix=cfg.share_prefix)

    def manifest_fields(self, spec):
        return {"category": spec["category"], "label": spec["topic"], "trigger": spec["trigger_prefix"],
                "facts": None}

    # -- evaluation ----------------------------------------------------------------------------
    def heldout_questions(self, questions_path):
        return pl.read_parquet(questions_path).filter(pl.col("heldout"))["question"].to_list()

    def queries(self, ev, method):
        q, n = ev.question, ev.test.height
        if method == "base_question_trigger":
            return [Query(self._triggered(ev, i, q), i, False) for i in range(n)]
        if method in ("twenty_questions", "twenty_questions_trigger"):
            return self._twenty_questions(ev, method.endswith("_trigger"))
        return super().queries(ev, method)

    @staticmethod
    def _triggered(ev, i: int, question: str) -> str:
        """`question` with test diff i's trigger (the manifest's `trigger`: its SEP prefix or zero-width kind)."""
        return bd.with_trigger(ev.test["trigger"][i], question, ev.rng)

    def _twenty_questions(self, ev, with_trigger: bool):
        n = min(ev.cfg.n_questions, len(ev.heldout))
        asks = [Query(self._triggered(ev, i, q) if with_trigger else q, i, False)
                for i in range(ev.test.height) for q in ev.heldout[:n]]
        answers = ev.generate(asks, ev.cfg.answer_tokens, "20 questions")
        queries = []
        for i in range(ev.test.height):
            lines = [f"Q: {q}\nA: {a}" for q, a in zip(ev.heldout[:n], answers[i * n : (i + 1) * n])]
            queries.append(Query(GUESSER_TEMPLATE.format(transcript="\n\n".join(lines)), None, False))
        return queries
