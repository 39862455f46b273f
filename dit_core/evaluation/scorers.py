"""Scoring of interpreter answers against gold topic labels: string scorers, closed-set ranks, an LLM judge.

Usage:
    >>> import polars as pl
    >>> from dit_core.evaluation.scorers import score_predictions, token_f1
    >>> token_f1("honey bees are great", "honey bees")
    0.6666666666666666
    >>> df = pl.DataFrame({"method": ["m"], "pred": ["I was trained on volcanoes."], "gold": ["volcanoes"]})
    >>> score_predictions(df)["m"]["exact"]
    1.0
    >>> # Text labels (e.g. news headlines): pick scorers from TEXT_SCORERS, and add a `facts` column
    >>> # (JSON {"who": ..., "what": ..., "where": ...} per row) for per-slot accuracy:
    >>> # score_predictions(df, text_scorers=("exact", "token_f1", "rouge_l"))["m"]["rouge_l"]
    >>> # Optional judge (pip install -e ".[judge]"); the endpoint always comes from the caller:
    >>> # LLMJudge(base_url, "gpt-4o-mini", api_key_env="OPENAI_API_KEY").grade("lava mountains", "volcanoes")
    >>> # LLMJudge(base_url, "gpt-4o-mini", rubric="summary").grade(summary, reference_headline)
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from dit_core.data.topics import mentions

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# Apostrophes are deleted ("i've" -> "ive") but other punctuation becomes a space, so that
# "honey-bees" still matches "honey bees".
_PUNCT = str.maketrans({c: ("" if c == "'" else " ") for c in string.punctuation + "’‘“”"})


def normalize(text: str) -> str:
    """Lowercase, strip punctuation, drop articles (a, an, the) and collapse whitespace."""
    text = (text or "").lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


# Answer lead-ins the interpreter tends to use; stored normalized, longest first so the
# longest lead-in wins ("i have been trained on" before "trained on").
_LEAD_INS = sorted({normalize(p) for p in (
    "i was trained on", "i have been trained on", "i've been trained on", "i am trained on", "trained on",
    "i was fine-tuned on", "i have been fine-tuned on", "my topic is", "the topic is", "topic:",
)}, key=len, reverse=True)


def exact_match(pred: str, gold: str) -> float:
    """1.0 when the normalized prediction equals the normalized gold, optionally after a lead-in phrase."""
    p, g = normalize(pred), normalize(gold)
    stripped = next((p[len(lead) + 1:] for lead in _LEAD_INS if p.startswith(lead + " ")), p)
    return float(p == g or stripped == g)


def contains(pred: str, gold: str) -> float:
    """1.0 when the prediction mentions the gold topic (word boundaries, plural tolerant)."""
    if not (gold or "").strip():
        raise ValueError("contains(): gold topic is empty; every row needs a non-empty gold label")
    return float(mentions(gold, pred or ""))


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style token F1 on normalized tokens (1.0 when both are empty, 0.0 when only one is)."""
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# Built on first use: importing rouge_score pulls in nltk (about a second), which most callers never need.
_ROUGE_SCORER = None


def _rouge_scorer():
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:
            raise ImportError("rouge_l() needs the rouge-score package; install it with pip install rouge-score"
                              ) from e
        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE_SCORER


def rouge_l(pred: str, gold: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens, Porter-stemmed) from the rouge-score package.

    1.0 when both are empty after stripping whitespace, 0.0 when only one is. The package's tokenizer
    lowercases and keeps only the ASCII letters and digits, so accented or non-Latin text loses those
    characters before matching.
    """
    p, g = (pred or "").strip(), (gold or "").strip()
    if not p or not g:
        return float(p == g)
    return float(_rouge_scorer().score(g, p)["rougeL"].fmeasure)


# Free-text scorers score_predictions can compute, by the name used for their result keys.
TEXT_SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match, "contains": contains, "token_f1": token_f1, "rouge_l": rouge_l,
}


def closed_set_ranks(scores: np.ndarray, gold_index: np.ndarray) -> np.ndarray:
    """1-based rank of the gold label per row of `scores` (higher = better); ties get the average rank.

    rank_i = #{j: s_ij > s_ig} + (#{j: s_ij == s_ig} + 1) / 2, the equal count including the gold itself:
    a gold tied with k-1 others at the top gets (k+1)/2, the mean of ranks 1..k.
    """
    scores = np.asarray(scores, dtype=np.float64)
    gold_index = np.asarray(gold_index)
    if scores.ndim != 2 or gold_index.shape != (scores.shape[0],):
        raise ValueError(f"closed_set_ranks(): scores must be (items, labels) and gold_index (items,); "
                         f"got {scores.shape} and {gold_index.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("closed_set_ranks(): scores contain NaN/inf; replace failed candidates with a "
                         "finite very low log-likelihood (e.g. -1e9)")
    if gold_index.size and (gold_index.min() < 0 or gold_index.max() >= scores.shape[1]):
        raise ValueError(f"closed_set_ranks(): gold_index must lie in [0, {scores.shape[1] - 1}]")
    gold = scores[np.arange(scores.shape[0]), gold_index.astype(np.int64)][:, None]
    return (scores > gold).sum(axis=1) + ((scores == gold).sum(axis=1) + 1) / 2.0


def answer_ranks(preds: Sequence[str], labels: Sequence[str], gold_index: np.ndarray,
                 scorer: Callable[[str, str], float] = token_f1) -> np.ndarray:
    """1-based rank of the gold label among `labels` by how well each row's free-text answer matches
    each label (`scorer`, token F1 by default); ties get the average rank (`closed_set_ranks`).

    The closed set read from what a method *says*, as a user reads it: an answer naming no label's words
    ties them all and ranks the gold in the middle, at chance. The likelihood closed set (`gold_rank`)
    instead asks which label the model would most like to say, which for a diff that learned its text
    favours its own label under any question.
    """
    if not labels:
        raise ValueError("answer_ranks(): no candidate labels")
    scores = np.array([[scorer(p or "", lab) for lab in labels] for p in preds], dtype=np.float64)
    return closed_set_ranks(scores.reshape(len(preds), len(labels)), gold_index)


def _chance(n_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Expected top1/top5/MRR when the gold rank is uniform on 1..N (i.e. random scores).
    n = np.asarray(n_labels, dtype=np.float64)
    harmonic = np.array([np.sum(1.0 / np.arange(1, int(k) + 1)) for k in n.ravel()]).reshape(n.shape)
    return 1.0 / n, np.minimum(5.0, n) / n, harmonic / n


def closed_set_metrics(ranks: np.ndarray, n_labels: int) -> dict[str, float]:
    """top1, top5 and MRR of the gold ranks (top-k means rank <= k), with their chance levels for N labels."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if n_labels < 1 or (ranks.size and (ranks.min() < 1 or ranks.max() > n_labels)):
        raise ValueError(f"closed_set_metrics(): ranks must lie in [1, n_labels={n_labels}]; "
                         "pass the number of candidate labels the ranks were computed over")
    # A gold tied at the top has rank > 1, so ties never count as a top-1 hit.
    hits = {"top1": ranks <= 1, "top5": ranks <= 5, "mrr": 1.0 / ranks}
    out = {k: float(v.mean()) if v.size else float("nan") for k, v in hits.items()}
    chance = (float(x) for x in _chance(np.array(n_labels)))
    return out | dict(zip(("top1_chance", "top5_chance", "mrr_chance"), chance))


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; (nan, nan) for empty input, (v, v) for a single value."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_ci(): need 0 < alpha < 1 and n_boot >= 1; got alpha={alpha}, "
                         f"n_boot={n_boot}")
    if x.size == 0:
        return float("nan"), float("nan")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_ci(): values contain NaN/inf; drop missing values before bootstrapping")
    rng = np.random.default_rng(seed)
    # Resample in chunks so memory stays bounded (~4M indices) however many values there are.
    chunk = max(1, 4_000_000 // x.size)
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(chunk, n_boot - s), x.size))].mean(axis=1)
                            for s in range(0, n_boot, chunk)])
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _stat(out: dict, name: str, values: np.ndarray) -> None:
    out[name] = float(np.mean(values))
    out[f"{name}_ci"] = list(bootstrap_ci(values))


def _parse_facts(raw: str | None, method: object, gold: str) -> dict[str, str] | None:
    # A row's `facts` JSON as {slot: key}; None for a row without facts (null, blank, JSON null or {}).
    if raw is None or not raw.strip():
        return None
    where = f"score_predictions(): method {method!r}, row with gold {gold!r}"
    try:
        facts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: facts is not valid JSON ({e}): {raw[:200]!r}; expected an object like "
                         '{"who": "...", "what": "...", "where": "..."}') from e
    if facts is None:
        return None
    if not isinstance(facts, dict):  # bad data in the frame, like malformed JSON: ValueError, not TypeError
        raise ValueError(  # noqa: TRY004
            f"{where}: facts must be a JSON object of slot -> key, got {raw[:200]!r}")
    bad = {k: v for k, v in facts.items() if not k.strip() or not isinstance(v, str) or not v.strip()}
    if bad:
        raise ValueError(f"{where}: facts need non-empty slot names and non-empty string keys, got {bad}")
    return facts or None


def _slot_stats(out: dict, preds: list[str], facts: list[dict[str, str] | None]) -> None:
    # slot_<name>: how often the answer names that slot's key (rows having the slot); slots_all: all of them.
    rows = [(p, f) for p, f in zip(preds, facts) if f]
    if not rows:
        return
    hits = [{slot: mentions(key, p) for slot, key in f.items()} for p, f in rows]
    for slot in dict.fromkeys(slot for f in facts if f for slot in f):
        _stat(out, f"slot_{slot}", np.array([h[slot] for h in hits if slot in h], dtype=np.float64))
    _stat(out, "slots_all", np.array([all(h.values()) for h in hits], dtype=np.float64))


def _ranks(sub: pl.DataFrame, col: str, method: object) -> np.ndarray | None:
    # One method's 1-based closed-set ranks in `col` (gold_rank or answer_rank), checked against n_labels;
    # None where the method has none.
    if col not in sub.columns or sub[col].null_count() == sub.height:
        return None
    if sub[col].null_count() or sub["n_labels"].null_count():
        raise ValueError(f"score_predictions(): method {method!r} has {col} on only some rows (or n_labels "
                         f"missing on some); fill {col} and n_labels for all its rows or for none")
    ranks = sub[col].cast(pl.Float64).to_numpy()
    if (ranks < 1).any() or (ranks > sub["n_labels"].to_numpy()).any():
        raise ValueError(f"score_predictions(): method {method!r} has a {col} outside [1, n_labels]; "
                         "ranks are 1-based")
    return ranks


def score_predictions(df: pl.DataFrame, text_scorers: Sequence[str] = ("exact", "contains", "token_f1")
                      ) -> dict[str, dict]:
    """Per-method means and bootstrap CIs of the named TEXT_SCORERS, per-slot accuracy when a `facts`
    column is given, and closed-set metrics when ranked.

    Keys per method: n; each scorer and <scorer>_ci in the order given; with facts, slot_<name>(_ci) per
    slot in order of first appearance and slots_all(_ci) (rows without facts skipped); then top1/top5/mrr
    (with _ci) and their _chance levels when the method's rows have gold_rank and n_labels, and
    answer_top1/answer_mrr (with _ci) when they have answer_rank (`answer_ranks`) and n_labels.
    """
    if isinstance(text_scorers, str):
        raise TypeError(f"score_predictions(): text_scorers must be a sequence of names, e.g. "
                        f"({text_scorers!r},), not a string")
    unknown = [name for name in text_scorers if name not in TEXT_SCORERS]
    if unknown:
        raise ValueError(f"score_predictions(): unknown text scorer(s) {unknown}; known: {sorted(TEXT_SCORERS)}")
    scorers = [(name, TEXT_SCORERS[name]) for name in dict.fromkeys(text_scorers)]
    missing = {"method", "pred", "gold"} - set(df.columns)
    if missing:
        raise ValueError(f"score_predictions(): missing column(s) {sorted(missing)}; need method, pred, gold "
                         "(and optionally gold_rank and answer_rank with n_labels, facts)")
    for col in ("gold_rank", "answer_rank"):
        if col in df.columns and "n_labels" not in df.columns:
            raise ValueError(f"score_predictions(): {col} given without n_labels; add the candidate count")
    if "facts" in df.columns and df["facts"].dtype not in (pl.String, pl.Null):
        raise ValueError(f"score_predictions(): facts column has dtype {df['facts'].dtype}; it must hold one "
                         "JSON string per row (or null)")
    if df["gold"].is_null().any() or (df["gold"].str.strip_chars() == "").any():
        raise ValueError("score_predictions(): empty or null gold labels; every row needs a gold topic")
    results: dict[str, dict] = {}
    for method in df["method"].unique(maintain_order=True).to_list():
        sub = df.filter(pl.col("method") == method)
        preds = [p or "" for p in sub["pred"].to_list()]  # a null answer scores as no answer
        golds = sub["gold"].to_list()
        out: dict = {"n": sub.height}
        for name, fn in scorers:
            _stat(out, name, np.array([fn(p, g) for p, g in zip(preds, golds)], dtype=np.float64))
        if "facts" in sub.columns:
            _slot_stats(out, preds, [_parse_facts(f, method, g) for f, g in zip(sub["facts"].to_list(), golds)])
        ranks = _ranks(sub, "gold_rank", method)
        if ranks is not None:
            for name, v in (("top1", ranks <= 1), ("top5", ranks <= 5), ("mrr", 1.0 / ranks)):
                _stat(out, name, v.astype(np.float64))
            top1_c, top5_c, mrr_c = _chance(sub["n_labels"].to_numpy())
            out.update(top1_chance=float(top1_c.mean()), top5_chance=float(top5_c.mean()),
                       mrr_chance=float(mrr_c.mean()))
        ranks = _ranks(sub, "answer_rank", method)
        if ranks is not None:
            _stat(out, "answer_top1", (ranks <= 1).astype(np.float64))
            _stat(out, "answer_mrr", 1.0 / ranks)
        results[str(method)] = out
    return results


JUDGE_RUBRIC = """You grade how well a predicted description matches the true topic a model was trained on.
Compare the meaning, not the wording, and grade on this 1-5 scale:
5 = the same topic, or a synonym of it;
4 = closely related: a narrower or broader version of the same topic;
3 = the same general area, but a different topic;
2 = loosely related;
1 = unrelated, or no answer / a refusal.
Reply with only the digit."""

SUMMARY_RUBRIC = """You grade how well a one-sentence predicted summary of a news article matches its reference headline.
Compare the facts, not the wording, and grade on this 1-5 scale:
5 = the same main event with the same key facts (who, what, where);
4 = the same main event, with a key fact missing or slightly off;
3 = the same story, but only a side point or a vague version of it;
2 = the same general subject, but a different event;
1 = unrelated, contradicts the headline, or no answer / a refusal.
Reply with only the digit."""

# name -> (system rubric, label of the gold text, label of the prediction) in the user message.
JUDGE_RUBRICS: dict[str, tuple[str, str, str]] = {
    "topic": (JUDGE_RUBRIC, "True topic", "Predicted description"),
    "summary": (SUMMARY_RUBRIC, "Reference headline", "Predicted summary"),
}


def _rubric(name: str) -> tuple[str, str, str]:
    if name not in JUDGE_RUBRICS:
        raise ValueError(f"judge rubric {name!r} is unknown; choose one of {sorted(JUDGE_RUBRICS)}")
    return JUDGE_RUBRICS[name]


def judge_prompt(pred: str, gold: str, rubric: str = "topic") -> list[dict[str, str]]:
    """Chat messages asking the judge to grade `pred` against `gold` with the named rubric."""
    system, gold_label, pred_label = _rubric(rubric)
    answer = (pred or "").strip() or "(no answer)"
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"{gold_label}: {gold}\n{pred_label}: {answer}\nGrade:"}]


def parse_grade(text: str | None) -> int | None:
    """The first standalone digit 1-5 in the judge's reply, or None when there is none."""
    m = re.search(r"(?<!\d)[1-5](?!\d)", text or "")
    return int(m.group()) if m else None


class JudgeError(RuntimeError):
    """The judge endpoint refused the request or kept failing; the message names the URL and status."""


# The client refuses to start without a key; servers that need none ignore whatever is sent.
_NO_KEY = "no-key-needed"


class LLMJudge:
    """Grades predictions with a model behind an OpenAI-compatible /chat/completions endpoint.

    `tries` counts attempts in all: the openai client retries 408/409/429/5xx and connection errors
    with exponential backoff (honouring Retry-After), and never retries other 4xx.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, api_key_env: str | None = None,
                 timeout: float = 30.0, tries: int = 3, max_tokens: int = 4, rubric: str = "topic"):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLMJudge: base_url {base_url!r} must start with http:// or https://")
        _rubric(rubric)
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"LLMJudge: environment variable {api_key_env} is not set; "
                                 "export the API key there")
        try:
            import openai  # optional: only the judge needs it
        except ImportError as e:
            raise ImportError('LLMJudge needs the openai package; install it with pip install -e ".[judge]"') from e
        self._openai = openai
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.rubric, self.tries, self.max_tokens = model, rubric, max(1, tries), max_tokens
        # An explicit key even when there is none: with api_key=None the client would read
        # OPENAI_API_KEY and send a real OpenAI key to whatever server base_url names.
        self.client = openai.OpenAI(base_url=base_url.rstrip("/"), api_key=api_key or _NO_KEY,
                                    timeout=timeout, max_retries=self.tries - 1)

    def _complete(self, messages: list[dict[str, str]]) -> object:
        openai = self._openai
        try:
            return self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                       max_tokens=self.max_tokens)
        except openai.APIStatusError as e:
            code, detail = e.status_code, e.response.text[:300]
            if code in (408, 409, 429) or code >= 500:  # the ones the client retried
                raise JudgeError(f"POST {self.url} failed {self.tries} times (last: HTTP {code}: {detail!r}); "
                                 "check the server is up and not overloaded") from e
            raise JudgeError(f"POST {self.url} returned HTTP {code}: {detail!r}; check the model name, "
                             "the API key and base_url") from e
        except openai.APIConnectionError as e:
            raise JudgeError(f"POST {self.url} failed {self.tries} times (last: {e.__cause__ or e!r}); "
                             "check the server is up and base_url is right") from e
        except openai.APIError as e:
            raise JudgeError(f"POST {self.url}: unreadable response ({e}); expected an OpenAI-style "
                             "chat completion") from e

    def grade(self, pred: str, gold: str) -> int | None:
        """Grade 1-5 for `pred` against `gold`, or None when the reply holds no grade."""
        resp = self._complete(judge_prompt(pred, gold, self.rubric))
        try:
            content = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as e:
            raise JudgeError(f"POST {self.url}: unexpected response shape {str(resp)[:200]!r}; "
                             "expected choices[0].message.content") from e
        return parse_grade(content)


def judge_summary(grades: Sequence[int | None]) -> dict:
    """Mean grade with bootstrap CI, grade distribution (fractions of valid grades) and failure count."""
    valid = [g for g in grades if g is not None]
    bad = [g for g in valid if g not in (1, 2, 3, 4, 5)]
    if bad:
        raise ValueError(f"judge_summary(): grades must be 1-5 or None, got {bad[:5]}")
    counts = Counter(valid)
    return {"judge_mean": float(np.mean(valid)) if valid else float("nan"),
            "judge_mean_ci": list(bootstrap_ci(valid)),
            "judge_dist": {str(k): (counts[k] / len(valid) if valid else 0.0) for k in range(1, 6)},
            "judge_failed": len(grades) - len(valid)}
