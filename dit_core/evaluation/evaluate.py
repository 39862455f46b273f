"""The evaluate stage: DIT against the paper's baselines on the test split.

Methods (each answers "what was this diff trained on?" for every test diff):
  dit                        base + diff + interpreter, asked the interpreter question
  base_question              base + diff, asked the same question (no interpreter)
  base_question_trigger      the same, with the diff's trigger prepended
  twenty_questions[_trigger] base + diff answers n held-out questions (with/without trigger); the base
                             model reads the transcript and names the topic
  no_diff                    interpreter on the base model, no diff (control: must be at chance)
  shuffled_diff              interpreter with another test diff (control: gold is still this diff's)
Each method is scored on its free-text answer (exact, contains, token F1, optional LLM judge) and on a
judge-free closed set: every test label ranked by its log-likelihood as the answer.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from dit_core.data.assemble import DitDataset
from dit_core.data.behavior_data import trigger_text
from dit_core.modeling.chat import chat_prompt, generate, inference_batch
from dit_core.config import Params
from dit_core.diffs.bank import DiffBank
from dit_core.modeling.batching import answer_logprobs, encode_example
from dit_core.interpreter.adapter import load_interpreter
from dit_core.io import write_json_atomic, write_parquet_atomic
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import LoadedModel
from dit_core.data.schemas import read_validated
from dit_core.evaluation.scorers import LLMJudge, closed_set_ranks, judge_summary, score_predictions

log = logging.getLogger(__name__)

GUESSER_TEMPLATE = (
    "Here are an assistant's answers to several unrelated questions:\n\n{transcript}\n\n"
    "The assistant keeps steering towards one topic. What is that topic? Answer with the topic only."
)


@dataclass
class Query:
    """How one method asks about one test item."""

    prompt: str  # user message
    diff: int | None  # index of the test diff to apply, or None
    adapter: bool  # interpreter on


class Evaluator:
    """Runs every configured method on the test split and scores it."""

    def __init__(self, p: Params, lm: LoadedModel, dataset_dir: str | Path, interpreter_dir: str | Path,
                 questions_path: str | Path):
        self.p, self.cfg, self.lm = p, p.eval, lm
        df = read_validated(Path(dataset_dir) / "dataset.parquet", DitDataset)
        self.test = df.filter(pl.col("split") == "test").sort("diff_id")
        if self.test.height == 0:
            raise ValueError(f"{dataset_dir}: the test split is empty; rerun assemble")
        self.labels = sorted(self.test["label"].unique().to_list())
        self.dm = DiffModel(lm.model, p.diffs.modules)
        self.interp = load_interpreter(self.dm, interpreter_dir, lm.tokenizer, lm.sha256)
        bank = DiffBank(df, self.dm.shapes(), lm.sha256)
        A, B, scale = bank.get(self.test["diff_id"].to_list())
        self.diffs = ({k: v.to(lm.device) for k, v in A.items()}, {k: v.to(lm.device) for k, v in B.items()},
                      scale.to(lm.device))
        q = pl.read_parquet(questions_path)
        self.heldout = q.filter(pl.col("heldout"))["question"].to_list()
        self.rng = random.Random(self.cfg.seed)

    # -- model access ---------------------------------------------------------------------------
    # Interpreter queries (dit and the controls) go through the interpreter object, whatever its kind;
    # baseline queries use the model itself: base + diff (factored, per row) with the interpreter off.
    def _generate(self, queries: list[Query], max_new_tokens: int, desc: str) -> list[str]:
        tok = self.lm.tokenizer
        out: list[str | None] = [None] * len(queries)
        interp_idx = [i for i, q in enumerate(queries) if q.adapter]
        for with_diff in (True, False):
            idx = [i for i in interp_idx if (queries[i].diff is not None) == with_diff]
            if idx:
                texts = self.interp.describe(tok, self.diffs if with_diff else None,
                                             [queries[i].diff or 0 for i in idx], max_new_tokens)
                for i, t in zip(idx, texts):
                    out[i] = t
        for with_diff in (True, False):
            idx = [i for i, q in enumerate(queries) if not q.adapter and (q.diff is not None) == with_diff]
            if not idx:
                continue
            rows = torch.tensor([queries[i].diff or 0 for i in idx], device=self.lm.device)
            prompts = [chat_prompt(tok, queries[i].prompt) for i in idx]
            try:
                if with_diff:
                    self.dm.set_diffs(*self.diffs[:2], scale=self.diffs[2])
                with self.dm.adapter_disabled():
                    gens = generate(self.lm.model, tok, prompts, max_new_tokens, inference_batch(self.lm.model), desc=desc,
                                    before_batch=(lambda s, e: self.dm.set_row_index(rows[s:e])) if with_diff else None)
            finally:
                self.dm.clear_diffs()
            for i, g in zip(idx, gens):
                out[i] = g.text
        return out

    def _closed_set(self, queries: list[Query]) -> np.ndarray:
        """scores[i, j] = log p(label j | query i), under the same model the query's method uses."""
        tok, n = self.lm.tokenizer, len(self.labels)
        scores = np.zeros((len(queries), n))
        for adapter in (True, False):
            for with_diff in (True, False):
                idx = [i for i, q in enumerate(queries) if q.adapter == adapter and (q.diff is not None) == with_diff]
                if not idx:
                    continue
                exs = [encode_example(tok, queries[i].prompt, lab, True, "trigger") for i in idx for lab in self.labels]
                rows = [queries[i].diff or 0 for i in idx for _ in self.labels]
                diffs = self.diffs if with_diff else None
                if adapter:
                    lp = self.interp.label_logprobs(diffs, rows, exs, tok.pad_token_id)
                else:
                    try:
                        if diffs is not None:
                            self.dm.set_diffs(*diffs[:2], scale=diffs[2])
                        with self.dm.adapter_disabled():
                            lp = answer_logprobs(self.dm, list(zip(rows, exs)), tok.pad_token_id)
                    finally:
                        self.dm.clear_diffs()
                scores[idx] = lp.view(len(idx), n).numpy()
        return scores

    # -- methods --------------------------------------------------------------------------------
    def _trigger(self, i: int) -> str:
        return trigger_text(self.test["trigger"][i], self.rng)

    def _twenty_questions(self, with_trigger: bool) -> list[Query]:
        n = min(self.cfg.n_questions, len(self.heldout))
        asks = []
        for i in range(self.test.height):
            for q in self.heldout[:n]:
                asks.append(Query(f"{self._trigger(i)} {q}" if with_trigger else q, i, False))
        answers = self._generate(asks, self.cfg.answer_tokens, "20 questions")
        queries = []
        for i in range(self.test.height):
            lines = [f"Q: {q}\nA: {a}" for q, a in zip(self.heldout[:n], answers[i * n : (i + 1) * n])]
            queries.append(Query(GUESSER_TEMPLATE.format(transcript="\n\n".join(lines)), None, False))
        return queries

    def queries(self, method: str) -> list[Query]:
        """The queries of one method, one per test item."""
        q, n = self.interp.spec.question, self.test.height
        if method == "dit":
            return [Query(q, i, True) for i in range(n)]
        if method == "base_question":
            return [Query(q, i, False) for i in range(n)]
        if method == "base_question_trigger":
            return [Query(f"{self._trigger(i)} {q}", i, False) for i in range(n)]
        if method == "no_diff":
            return [Query(q, None, True) for i in range(n)]
        if method == "shuffled_diff":
            return [Query(q, self._other(i), True) for i in range(n)]
        if method == "twenty_questions":
            return self._twenty_questions(False)
        if method == "twenty_questions_trigger":
            return self._twenty_questions(True)
        raise ValueError(f"unknown eval method {method!r}")

    def _other(self, i: int) -> int:
        labels = self.test["label"].to_list()
        others = [j for j in range(len(labels)) if labels[j] != labels[i]] or [j for j in range(len(labels)) if j != i] or [i]
        return others[(i * 7 + 3) % len(others)]

    def run(self) -> pl.DataFrame:
        """Predictions of every method: method, diff_id, gold, pred, gold_rank, n_labels."""
        frames = []
        gold = self.test["label"].to_list()
        gold_idx = np.array([self.labels.index(g) for g in gold])
        for method in self.cfg.methods:
            log.info("evaluating %s on %d test diffs", method, len(gold))
            qs = self.queries(method)
            preds = self._generate(qs, self.cfg.max_new_tokens, method)
            ranks = closed_set_ranks(self._closed_set(qs), gold_idx)
            frames.append(pl.DataFrame({
                "method": method, "diff_id": self.test["diff_id"], "gold": gold, "pred": preds,
                "gold_rank": ranks.astype(float), "n_labels": len(self.labels),
                "prompt": [x.prompt for x in qs]}))
        return pl.concat(frames)


def evaluate(p: Params, lm: LoadedModel, dataset_dir, interpreter_dir, questions_path, reports_dir) -> dict:
    """Run the evaluation, write predictions.parquet, metrics.json, table.md and plots."""
    reports_dir = Path(reports_dir)
    preds = Evaluator(p, lm, dataset_dir, interpreter_dir, questions_path).run()
    metrics = score_predictions(preds.drop("prompt"))
    judge_cfg = p.eval.judge
    if judge_cfg.base_url:
        judge = LLMJudge(judge_cfg.base_url, judge_cfg.model, api_key_env=judge_cfg.api_key_env,
                         rubric=judge_cfg.rubric)
        grades = [judge.grade(pr, g) for pr, g in zip(preds["pred"], preds["gold"])]
        preds = preds.with_columns(judge=pl.Series(grades, dtype=pl.Int64))
        for method in metrics:
            sub = [g for g, m in zip(grades, preds["method"]) if m == method]
            metrics[method].update(judge_summary(sub))
    write_parquet_atomic(preds, reports_dir / "predictions.parquet")
    write_json_atomic(reports_dir / "metrics.json", metrics)
    from dit_core.evaluation.report import markdown_table, plot_scores

    table = markdown_table(metrics)
    (reports_dir / "table.md").write_text(table)
    plot_scores(metrics, reports_dir / "scores.png")
    return {"metrics": metrics, "table": table}
