"""How sure the interpreter is of an answer, and the threshold below which it says "unsure".

Score. For a diff, every label of the interpreter's known vocabulary (the labels of its training split, per
behaviour, recorded in interpreter.json as `labels`) is scored by its total log-likelihood as the answer
(label + end of turn) under base + diff + interpreter, asked the behaviour's question: the objective the
interpreter was trained on. The confidence is the softmax probability of the best label over that vocabulary:

    confidence = p(best label) = 1 / sum_j exp(s_j - s_best)        (s_j: log-likelihood of label j)

Why this one as the primary score: it is a probability in [0, 1] with the same meaning for every diff and
every vocabulary size, so one threshold chosen on the validation split applies to all diffs; it uses every
label's evidence, not only the runner-up; and it grows with the margin to the second-best label
(`margin = s_best - s_second`, also returned; for two labels the confidence is sigmoid(margin)). The answer's
own mean token log-probability ignores whether another label would fit just as well, and a margin in nats
is unbounded and not comparable across vocabulary sizes.

Threshold. When interpreter training ends, the validation diffs of each behaviour are scored; the threshold
is the confidence of the least confident validation answer in the largest confidence-ordered set of
answers whose accuracy (best label == the diff's label) reaches `interpreter.unsure_accuracy`. It is
recorded in interpreter.json (`calibration`: behaviour -> threshold, target, val coverage and accuracy).
If no set reaches the target, `threshold` is null and every answer is unsure. An answer is unsure when
its confidence is below the threshold.

No-behaviour answer. An interpreter trained with `interpreter.null_rate` > 0 also learned to answer
`null_answer` (default "none") on the zero diff (dit_core/interpreter/training.py: `_epoch_rows`); the
evaluation's random-noise diffs stay unseen in training. That answer joins the vocabulary (last), so
the confidence of a known label is its probability against "none" as well as against the other
labels. An out-of-distribution diff counts as confidently wrong only when it is confidently named a
known label.
describe's `no_behavior` is whether the answer itself is the null answer: a diff of a new news story
has a behaviour, and its best label may still be "none" (no known headline fits it better).

Interpreters saved before labels were recorded describe as before with confidence and unsure null; ones
with labels but no calibration (no validation diffs) give a confidence and unsure null.

Evaluation (`evaluate_confidence`): accuracy against coverage on the test split (curve and area), and the
rate of confident answers (confidence >= threshold: wrong by construction) on out-of-distribution diffs:
random-noise diffs with the same per-module Frobenius norm as each test diff, the zero diff, and test diffs
of the dataset's other behaviours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from dit_core.interpreter.adapter import InterpreterSpec, label_example

if TYPE_CHECKING:
    from dit_core.evaluation.evaluate import Evaluator

SCORE = "label_probability"  # the primary score's name, recorded with the calibration
Diffs = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]


@dataclass
class Confidence:
    """Per diff: the best label of the vocabulary, its probability over the vocabulary, the log-likelihood
    margin to the second-best label (inf with one label)."""

    best: list[str]
    confidence: np.ndarray
    margin: np.ndarray


def from_scores(scores: np.ndarray, labels: list[str]) -> Confidence:
    """Confidence from scores[i, j] = log-likelihood of label j for diff i."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(labels) or not labels:
        raise ValueError(f"scores of shape {s.shape} for {len(labels)} labels: expected (n_diffs, n_labels), n_labels >= 1")
    if not np.isfinite(s).all():
        raise ValueError("label log-likelihoods contain NaN/Inf: the diff or interpreter weights are not finite")
    order = np.argsort(-s, axis=1, kind="stable")
    top = np.take_along_axis(s, order[:, :1], 1)
    conf = 1.0 / np.exp(s - top).sum(axis=1)
    margin = (top[:, 0] - np.take_along_axis(s, order[:, 1:2], 1)[:, 0]) if s.shape[1] > 1 else np.full(len(s), np.inf)
    return Confidence([labels[j] for j in order[:, 0]], conf, margin)


@torch.no_grad()
def label_scores(interp, tokenizer, question: str, labels: list[str], diffs: Diffs | None, rows: list[int],
                 chunk: int = 16, desc: str = "confidence") -> np.ndarray:
    """scores[i, j] = log-likelihood of labels[j] as the answer to `question` under base + diff rows[i] +
    interpreter (diffs None: no diff), batched over chunks of diffs x all labels."""
    examples = [label_example(tokenizer, question, lab) for lab in labels]
    out = np.zeros((len(rows), len(labels)))
    starts = range(0, len(rows), chunk)
    for s in tqdm(starts, desc=desc, disable=len(starts) < 4, leave=False):
        part = rows[s : s + chunk]
        lp = interp.label_logprobs(diffs, [r for r in part for _ in labels], examples * len(part),
                                   tokenizer.pad_token_id)
        out[s : s + len(part)] = lp.view(len(part), len(labels)).double().numpy()
    return out


# -- the unsure threshold ------------------------------------------------------------------------
def choose_threshold(confidence, correct, target: float) -> dict:
    """The threshold at which the kept answers (confidence >= threshold) reach `target` accuracy with the
    most kept: the confidence of the least confident answer of the largest confidence-ordered set whose
    accuracy is >= target (null when none is). Returns threshold, target, coverage, accuracy, n, reached."""
    conf, ok = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if conf.shape != ok.shape or conf.ndim != 1:
        raise ValueError(f"confidence {conf.shape} and correct {ok.shape}: expected two equal-length vectors")
    record = {"score": SCORE, "target": float(target), "n": int(len(conf)), "threshold": None,
              "coverage": 0.0, "accuracy": None, "reached": False}
    if not len(conf):
        return record
    order = np.argsort(-conf, kind="stable")
    c, k = conf[order], np.cumsum(ok[order])
    # a threshold keeps every answer at least as confident: only the last of a run of ties is a cut
    cuts = [i for i in range(len(c)) if i == len(c) - 1 or c[i + 1] < c[i]]
    good = [i for i in cuts if k[i] / (i + 1) >= target - 1e-12]
    if good:
        i = good[-1]
        record.update(threshold=float(c[i]), coverage=(i + 1) / len(c), accuracy=float(k[i] / (i + 1)), reached=True)
    return record


def is_unsure(confidence: float | None, calibration: dict | None) -> bool | None:
    """Whether an answer of this confidence is unsure (None: no confidence or no calibration)."""
    if confidence is None or calibration is None:
        return None
    t = calibration.get("threshold")
    return True if t is None else bool(confidence < t)


def behavior_key(spec: InterpreterSpec, behavior: str | None) -> str | None:
    """The behaviour whose vocabulary and calibration apply: `behavior`, else the interpreter's first."""
    if behavior:
        return behavior
    for names in (spec.questions, spec.labels):
        if names:
            return next(iter(names))
    return None


def calibrate(interp, tokenizer, questions: dict[str, str], train_df: pl.DataFrame, val_df: pl.DataFrame,
              bank, device, target: float, batch_size: int = 16, null_answer: str | None = None
              ) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Each behaviour's label vocabulary (its training labels, then `null_answer` when the interpreter was
    trained with one) and, where it has validation diffs, the unsure threshold chosen on them
    (`choose_threshold` at `target`); `interp` holds the kept weights and `bank` (a DiffBank) has the val
    diffs."""
    labels: dict[str, list[str]] = {}
    calibration: dict[str, dict] = {}
    for behavior, question in questions.items():
        vocab = sorted(train_df.filter(pl.col("behavior") == behavior)["label"].unique().to_list())
        if not vocab:
            continue
        vocab += [null_answer] if null_answer is not None else []
        labels[behavior] = vocab
        val = val_df.filter(pl.col("behavior") == behavior)
        if val.height == 0:
            continue
        scores = np.zeros((val.height, len(vocab)))
        for s in range(0, val.height, batch_size):
            ids = val["diff_id"].slice(s, batch_size).to_list()
            A, B, scale = bank.get(ids)
            diffs = ({k: v.to(device) for k, v in A.items()}, {k: v.to(device) for k, v in B.items()}, scale.to(device))
            scores[s : s + len(ids)] = label_scores(interp, tokenizer, question, vocab, diffs, list(range(len(ids))))
        conf = from_scores(scores, vocab)
        correct = [b == g for b, g in zip(conf.best, val["label"])]
        calibration[behavior] = choose_threshold(conf.confidence, correct, target)
    return labels, calibration


def recalibrate(lm, interpreter_dir: str | Path, dataset_dir: str | Path, target: float, modules: str = r".*",
                batch_size: int = 16) -> dict[str, dict]:
    """Record the label vocabulary and unsure threshold in an interpreter saved without them (or again at
    another `target`), from the dataset it was trained on; interpreter.json is rewritten atomically, the
    weights untouched. Refuses a dataset other than the interpreter's own (its data_version)."""
    import json
    from dataclasses import asdict

    from dit_core.data.assemble import DitDataset
    from dit_core.data.schemas import read_validated
    from dit_core.diffs.bank import DiffBank
    from dit_core.interpreter.adapter import SPEC, WEIGHTS_SHA256, load_interpreter
    from dit_core.interpreter.training import dataset_version
    from dit_core.io import write_json_atomic
    from dit_core.modeling.lora import DiffModel

    interpreter_dir, path = Path(interpreter_dir), Path(dataset_dir) / "dataset.parquet"
    dm = DiffModel(lm.model, modules)
    interp = load_interpreter(dm, interpreter_dir, lm.tokenizer, lm.sha256)
    spec = interp.spec
    if spec.data_version and spec.data_version != dataset_version(path):
        raise ValueError(f"{interpreter_dir} was trained on dataset version {spec.data_version}, not {path} "
                         f"({dataset_version(path)}): pass the dataset it was trained on")
    df = read_validated(path, DitDataset)
    train, val = df.filter(pl.col("split") == "train"), df.filter(pl.col("split") == "val")
    questions = spec.questions or {b: spec.question for b in train["behavior"].head(1)}
    labels, calibration = calibrate(interp, lm.tokenizer, questions, train, val,
                                    DiffBank(val, dm.shapes(), lm.sha256), lm.device, target, batch_size,
                                    spec.null_answer)
    sha = json.loads((interpreter_dir / SPEC).read_text()).get(WEIGHTS_SHA256)
    write_json_atomic(interpreter_dir / SPEC, asdict(spec) | {"labels": labels, "calibration": calibration}
                      | ({WEIGHTS_SHA256: sha} if sha else {}))
    return calibration


def describe_confidence(interp, tokenizer, behavior: str | None, question: str, diffs: Diffs,
                        n: int) -> list[dict]:
    """Per diff row 0..n-1: confidence, margin, best_label, unsure (all None for an interpreter without a
    label vocabulary)."""
    key = behavior_key(interp.spec, behavior)
    vocab = (interp.spec.labels or {}).get(key) if key else None
    if not vocab:
        return [{"confidence": None, "margin": None, "best_label": None, "unsure": None} for _ in range(n)]
    calib = (interp.spec.calibration or {}).get(key)
    conf = from_scores(label_scores(interp, tokenizer, question, vocab, diffs, list(range(n))), vocab)
    return [{"confidence": float(c), "margin": float(m) if math.isfinite(m) else None, "best_label": b,
             "unsure": is_unsure(float(c), calib)} for b, c, m in zip(conf.best, conf.confidence, conf.margin)]


# -- out-of-distribution diffs -------------------------------------------------------------------
def delta_norms(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B_n @ A_n||_F per stacked diff n (A: (N, r, out), B: (N, in, r)) without forming B @ A:
    ||B A||_F^2 = sum((B^T B) * (A A^T))."""
    A64, B64 = A.double(), B.double()
    gram = (B64.transpose(1, 2) @ B64) * (A64 @ A64.transpose(1, 2))
    return gram.sum(dim=(1, 2)).clamp_min(0).sqrt()


def noise_diffs(A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], seed: int = 0
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random Gaussian factors of the same shapes whose product has, per module and per diff, the same
    Frobenius norm as the given diff's (same scale applies): noise of the test diffs' size."""
    g = torch.Generator().manual_seed(seed)
    nA, nB = {}, {}
    for m in A:
        a = torch.randn(A[m].shape, generator=g, dtype=torch.float64)
        b = torch.randn(B[m].shape, generator=g, dtype=torch.float64)
        target = delta_norms(A[m].cpu(), B[m].cpu())
        have = delta_norms(a, b)
        a = a * (target / have.clamp_min(1e-30)).view(-1, 1, 1)
        nA[m], nB[m] = a.to(A[m].dtype).to(A[m].device), b.to(B[m].dtype).to(B[m].device)
    return nA, nB


def zero_diffs(A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], n: int = 1
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """n zero diffs with the factor shapes of the given ones (base + interpreter alone)."""
    return ({m: torch.zeros((n, *v.shape[1:]), dtype=v.dtype, device=v.device) for m, v in A.items()},
            {m: torch.zeros((n, *v.shape[1:]), dtype=v.dtype, device=v.device) for m, v in B.items()})


def accuracy_coverage(confidence, correct) -> dict:
    """Answers ordered by confidence, most confident first: accuracy of the k most confident for
    coverage k/n (k = 1..n), and the area under that curve (the mean of those accuracies)."""
    conf, ok = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if not len(conf):
        return {"coverage": [], "accuracy": [], "area": None}
    order = np.argsort(-conf, kind="stable")
    acc = np.cumsum(ok[order]) / np.arange(1, len(conf) + 1)
    return {"coverage": (np.arange(1, len(conf) + 1) / len(conf)).tolist(), "accuracy": acc.tolist(),
            "area": float(acc.mean())}


def evaluate_confidence(ev: Evaluator, dataset_dir: str | Path) -> dict | None:
    """metrics.json `dit.confidence` of one behaviour: the test split's accuracy-coverage curve and area,
    coverage and accuracy at the recorded threshold, and the confident-answer rate on noise, zero and
    other-behaviour diffs. None when the interpreter has no vocabulary for this behaviour and the dataset
    no training labels of it."""
    from dit_core.diffs.bank import DiffBank
    from dit_core.data.assemble import DitDataset
    from dit_core.data.schemas import read_validated

    spec, name, tok = ev.interp.spec, ev.behavior.name, ev.lm.tokenizer
    vocab = (spec.labels or {}).get(name) or sorted(ev.train["label"].unique().to_list())
    null = spec.null_answer if spec.null_answer in vocab else None
    if not vocab:
        return None
    calib = (spec.calibration or {}).get(name)
    n = ev.test.height

    def run(diffs, rows, desc):
        return from_scores(label_scores(ev.interp, tok, ev.question, vocab, diffs, rows, desc=desc), vocab)

    test = run(ev.diffs, list(range(n)), "confidence: test")
    correct = [b == g for b, g in zip(test.best, ev.test["label"])]
    out = {"score": SCORE, "n_labels": len(vocab), "null_answer": null, "calibrated": calib is not None,
           "threshold": calib.get("threshold") if calib else None, "target": calib.get("target") if calib else None,
           "curve": accuracy_coverage(test.confidence, correct), "mean_confidence": float(test.confidence.mean())}
    out["area"] = out["curve"]["area"]

    def confident(c: Confidence) -> np.ndarray:
        """Confidently named a known label (the null answer names none)."""
        return np.array([is_unsure(float(x), calib) is False and b != null for b, x in zip(c.best, c.confidence)])

    def answered_null(c: Confidence) -> float | None:
        return float(np.mean([b == null for b in c.best])) if null is not None else None

    out["test_answered_null"] = answered_null(test)

    if calib is not None:
        kept = confident(test)
        out["test_coverage"] = float(kept.mean())
        out["test_accuracy_kept"] = float(np.mean(np.array(correct)[kept])) if kept.any() else None
        out["test_confident_wrong"] = float(np.mean(kept & ~np.array(correct)))
    A, B, scale = ev.diffs
    noise = run((*noise_diffs(A, B, ev.cfg.seed), scale), list(range(n)), "confidence: noise")
    zA, zB = zero_diffs(A, B)
    zero = run((zA, zB, scale[:1]), [0], "confidence: zero")
    ood = {"noise": noise, "zero": zero}
    df = read_validated(Path(dataset_dir) / "dataset.parquet", DitDataset)
    other = df.filter((pl.col("split") == "test") & (pl.col("behavior") != name)).sort("diff_id")
    if other.height:
        oA, oB, oscale = DiffBank(other, ev.dm.shapes(), ev.lm.sha256).get(other["diff_id"].to_list())
        dev = ev.lm.device
        odiffs = ({k: v.to(dev) for k, v in oA.items()}, {k: v.to(dev) for k, v in oB.items()}, oscale.to(dev))
        ood["other_behavior"] = run(odiffs, list(range(other.height)), "confidence: other behaviour")
    out["ood"] = {kind: {"n": len(c.best), "mean_confidence": float(c.confidence.mean()),
                         "confident_wrong": float(confident(c).mean()) if calib is not None else None,
                         "answered_null": answered_null(c)}
                  for kind, c in ood.items()}
    return out
