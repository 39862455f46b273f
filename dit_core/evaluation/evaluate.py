"""The evaluate stage: DIT against the paper's baselines on the test split, behaviour by behaviour.

Methods (each answers "what was this diff trained on?" for every test diff):
  dit                        base + diff + interpreter, asked the behaviour's interpreter question
  base_question              base + diff, asked the same question (no interpreter)
  no_diff                    interpreter on the base model, no diff (control: must be at chance)
  shuffled_diff              interpreter with another test diff (control: gold is still this diff's)
and each behaviour's own baselines (dit_core/behaviors):
  hidden_topic  base_question_trigger (the question after the diff's trigger); twenty_questions[_trigger]
                (base + diff answers n held-out questions; the base model names the topic from the transcript)
  news          twenty_questions (the base model summarises the transcript); generated_story (base + diff
                writes the news it knows, the base model summarises it in one sentence)
Each method is scored on its free-text answer (the behaviour's text scorers, per-slot accuracy where labels
state facts, optional LLM judge) and on two judge-free closed sets of every test label of the behaviour:
ranked by its log-likelihood as the answer (top1, mrr), and by how well the free-text answer matches it
(answer_top1, answer_mrr: token F1, ties at their average rank). DIT's answers also get their confidence
evaluated (metrics `dit.confidence`, coverage.png: accuracy against coverage, confident answers on
out-of-distribution diffs; docs/confidence.md).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import polars as pl

from dit_core.behaviors import Behavior, Query, get_behavior
from dit_core.data.assemble import DitDataset
from dit_core.modeling.chat import chat_prompt, generate, inference_batch
from dit_core.config import Params
from dit_core.diffs.bank import DiffBank
from dit_core.modeling.batching import answer_logprobs, encode_example
from dit_core.interpreter.adapter import load_interpreter
from dit_core.io import write_json_atomic, write_parquet_atomic, write_text_atomic
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import LoadedModel
from dit_core.data.schemas import read_validated
from dit_core.evaluation.scorers import LLMJudge, answer_ranks, closed_set_ranks, judge_summary, score_predictions

log = logging.getLogger(__name__)

class Evaluator:
    """Runs every configured method of one behaviour on its test diffs and scores them."""

    def __init__(self, p: Params, lm: LoadedModel, dataset_dir: str | Path, interpreter_dir: str | Path,
                 questions_path: str | Path | None, behavior: Behavior | None = None):
        self.p, self.cfg, self.lm = p, p.eval, lm
        df = read_validated(Path(dataset_dir) / "dataset.parquet", DitDataset)
        test = df.filter(pl.col("split") == "test")
        if test.height == 0:
            raise ValueError(f"{dataset_dir}: the test split is empty; rerun assemble")
        self.behavior = behavior or get_behavior(test["behavior"][0])
        self.test = test.filter(pl.col("behavior") == self.behavior.name).sort("diff_id")
        if self.test.height == 0:
            raise ValueError(f"{dataset_dir}: no test diff of behaviour {self.behavior.name!r}")
        self.train = df.filter((pl.col("split") == "train") & (pl.col("behavior") == self.behavior.name))
        self.labels = sorted(self.test["label"].unique().to_list())
        self.dm = DiffModel(lm.model, p.diffs.modules)
        self.interp = load_interpreter(self.dm, interpreter_dir, lm.tokenizer, lm.sha256)
        # The interpreter's own question for this behaviour; one trained without it (e.g. on another
        # behaviour only) is asked this behaviour's question from params.
        self.question = self.interp.spec.question_for(self.behavior.name, self.behavior.question(p))
        bank = DiffBank(df, self.dm.shapes(), lm.sha256)
        A, B, scale = bank.get(self.test["diff_id"].to_list())
        self.diffs = ({k: v.to(lm.device) for k, v in A.items()}, {k: v.to(lm.device) for k, v in B.items()},
                      scale.to(lm.device))
        self.heldout = self.behavior.heldout_questions(Path(questions_path) if questions_path else None)
        self.rng = random.Random(self.cfg.seed)

    @property
    def methods(self) -> list[str]:
        """eval.methods that this behaviour answers, in their configured order."""
        return [m for m in self.cfg.methods if m in self.behavior.methods]

    # -- model access ---------------------------------------------------------------------------
    # Interpreter queries (dit and the controls) go through the interpreter object, whatever its kind;
    # baseline queries use the model itself: base + diff (factored, per row) with the interpreter off.
    def generate(self, queries: list[Query], max_new_tokens: int, desc: str) -> list[str]:
        tok = self.lm.tokenizer
        out: list[str | None] = [None] * len(queries)
        interp_idx = [i for i, q in enumerate(queries) if q.adapter]
        for with_diff in (True, False):
            idx = [i for i in interp_idx if (queries[i].diff is not None) == with_diff]
            if idx:
                texts = self.interp.describe(tok, self.diffs if with_diff else None,
                                             [queries[i].diff or 0 for i in idx], max_new_tokens, self.question)
                for i, t in zip(idx, texts):
                    out[i] = t
        for with_diff in (True, False):
            idx = [i for i, q in enumerate(queries) if not q.adapter and (q.diff is not None) == with_diff]
            if not idx:
                continue
            rows = [queries[i].diff or 0 for i in idx]
            prompts = [chat_prompt(tok, queries[i].prompt) for i in idx]
            try:
                if with_diff:
                    self.dm.set_diffs(*self.diffs[:2], scale=self.diffs[2])
                with self.dm.adapter_disabled():
                    gens = generate(self.lm.model, tok, prompts, max_new_tokens, inference_batch(self.lm.model), desc=desc,
                                    rows=rows if with_diff else None, set_rows=self.dm.set_row_index)
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
    def queries(self, method: str) -> list[Query]:
        """The queries of one method, one per test item (the behaviour builds its own baselines)."""
        q, n = self.question, self.test.height
        if method == "dit":
            return [Query(q, i, True) for i in range(n)]
        if method == "base_question":
            return [Query(q, i, False) for i in range(n)]
        if method == "no_diff":
            return [Query(q, None, True) for i in range(n)]
        if method == "shuffled_diff":
            return [Query(q, self._other(i), True) for i in range(n)]
        if method in self.behavior.baselines:
            return self.behavior.queries(self, method)
        raise ValueError(f"unknown eval method {method!r} for behaviour {self.behavior.name!r}")

    def _other(self, i: int) -> int:
        labels = self.test["label"].to_list()
        others = [j for j in range(len(labels)) if labels[j] != labels[i]] or [j for j in range(len(labels)) if j != i] or [i]
        return others[(i * 7 + 3) % len(others)]

    def run(self) -> pl.DataFrame:
        """Predictions of every method: method, diff_id, gold, pred, gold_rank (likelihood closed set),
        answer_rank (closed set by the answer's words), n_labels, prompt, facts, subset."""
        frames = []
        gold = self.test["label"].to_list()
        gold_idx = np.array([self.labels.index(g) for g in gold])
        for method in self.methods:
            log.info("evaluating %s on %d %s test diffs", method, len(gold), self.behavior.name)
            qs = self.queries(method)
            preds = self.generate(qs, self.cfg.max_new_tokens, method)
            ranks = closed_set_ranks(self._closed_set(qs), gold_idx)
            frames.append(pl.DataFrame({
                "method": method, "diff_id": self.test["diff_id"], "gold": gold, "pred": preds,
                "gold_rank": ranks.astype(float), "answer_rank": answer_ranks(preds, self.labels, gold_idx),
                "n_labels": len(self.labels),
                "prompt": [x.prompt for x in qs], "facts": self.test["facts"],
                "subset": self.subsets()}))
        return pl.concat(frames)

    def subsets(self) -> list[str]:
        """Per test diff, how new it is to this behaviour's training split (`novelty`)."""
        return novelty(self.train, self.test)


def novelty(train: pl.DataFrame, test: pl.DataFrame) -> list[str]:
    """Per test row (label, facts), how new it is to the training rows: `seen label` (a training diff has
    its label), `unseen combination` (every fact seen in training, never together), `partly unseen` (some
    facts seen), `unseen` (no fact, or a label without facts, seen)."""
    train_labels = set(train["label"].str.to_lowercase())
    seen: dict[str, set[str]] = {}
    for facts in train["facts"].drop_nulls():
        for slot, key in json.loads(facts).items():
            seen.setdefault(slot, set()).add(key.lower())
    out = []
    for label, facts in zip(test["label"], test["facts"]):
        if label.lower() in train_labels:
            out.append("seen label")
            continue
        keys = json.loads(facts).items() if facts else []
        hits = [key.lower() in seen.get(slot, set()) for slot, key in keys]
        out.append("unseen combination" if hits and all(hits) else "partly unseen" if any(hits) else "unseen")
    return out


def _score(p: Params, behavior: Behavior, preds: pl.DataFrame) -> dict:
    """Metrics per method of one behaviour's predictions, with per-subset scores where there are several
    subsets (e.g. unseen combinations and unseen stories) and the optional judge."""
    metrics = score_predictions(preds.drop("prompt", "subset"), behavior.text_scorers)
    subsets = preds["subset"].unique(maintain_order=True).to_list()
    if len(subsets) > 1 or subsets[0] != "seen label":
        for subset in subsets:
            part = score_predictions(preds.filter(pl.col("subset") == subset).drop("prompt", "subset"),
                                     behavior.text_scorers)
            for method, m in part.items():
                metrics[method].setdefault("subsets", {})[subset] = m
    judge_cfg = p.eval.judge
    if judge_cfg.base_url:
        rubric = behavior.judge_rubric if judge_cfg.rubric == "auto" else judge_cfg.rubric
        judge = LLMJudge(judge_cfg.base_url, judge_cfg.model, api_key_env=judge_cfg.api_key_env, rubric=rubric)
        grades = [judge.grade(pr, g) for pr, g in zip(preds["pred"], preds["gold"])]
        for method in metrics:
            sub = [g for g, m in zip(grades, preds["method"]) if m == method]
            metrics[method].update(judge_summary(sub))
        preds = preds.with_columns(judge=pl.Series(grades, dtype=pl.Int64))
    return {"metrics": metrics, "preds": preds}


def behaviors_in_test(dataset_dir: str | Path, order: list[str]) -> list[str]:
    """The behaviours of the dataset's test split, in params order (others after, by name)."""
    present = set(pl.read_parquet(Path(dataset_dir) / "dataset.parquet", columns=["behavior", "split"])
                  .filter(pl.col("split") == "test")["behavior"])
    return [b for b in order if b in present] + sorted(present - set(order))


def dit_summary(metrics: dict, behaviors: list[str]) -> dict:
    """DIT's metrics: one behaviour's as they are; for several, each numeric metric's mean over behaviours."""
    if len(behaviors) == 1:
        return metrics.get("dit", {})
    per = [metrics[b]["dit"] for b in behaviors if "dit" in metrics.get(b, {})]
    keys = [k for k, v in per[0].items() if isinstance(v, (int, float))] if per else []
    return {k: float(np.mean([m[k] for m in per if k in m])) for k in keys}


def evaluate(p: Params, lm: LoadedModel, dataset_dir, interpreter_dir, questions_path, reports_dir) -> dict:
    """Run the evaluation of every behaviour in the test split; write predictions.parquet, metrics.json,
    table.md and plots.

    metrics.json maps method -> metrics for a single behaviour, behaviour -> method -> metrics for several;
    the result's `by_behavior` is behaviour -> method -> metrics in either case, and `dit` is DIT's metrics
    (averaged over behaviours when there are several).
    """
    from dit_core.evaluation.report import behavior_tables, plot_coverage, plot_scores
    from dit_core.interpreter.confidence import evaluate_confidence

    reports_dir = Path(reports_dir)
    names = behaviors_in_test(dataset_dir, p.behaviors)
    per_behavior, frames = {}, []
    for name in names:
        b = get_behavior(name)
        ev = Evaluator(p, lm, dataset_dir, interpreter_dir, questions_path, b)
        scored = _score(p, b, ev.run())
        per_behavior[name] = scored["metrics"]
        if "dit" in per_behavior[name]:  # how sure DIT's answers are: dit_core/interpreter/confidence.py
            conf = evaluate_confidence(ev, dataset_dir)
            if conf is not None:
                per_behavior[name]["dit"]["confidence"] = conf
        frames.append(scored["preds"].with_columns(behavior=pl.lit(name)))
    preds = pl.concat(frames, how="diagonal_relaxed")
    if len(names) == 1:
        preds = preds.drop("behavior")
    metrics = per_behavior[names[0]] if len(names) == 1 else per_behavior
    write_parquet_atomic(preds, reports_dir / "predictions.parquet")
    write_json_atomic(reports_dir / "metrics.json", metrics)
    table = behavior_tables(per_behavior)
    write_text_atomic(reports_dir / "table.md", table)
    plot_scores(per_behavior[names[0]], reports_dir / "scores.png")
    for name in names[1:]:
        plot_scores(per_behavior[name], reports_dir / f"scores_{name}.png")
    plot_coverage(per_behavior, reports_dir)
    return {"metrics": metrics, "by_behavior": per_behavior, "table": table, "dit": dit_summary(metrics, names),
            "behaviors": names}
