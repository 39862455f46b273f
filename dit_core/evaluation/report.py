"""Human-readable outputs: the paper-style markdown table and PNG plots."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from dit_core.io import save_figure_atomic

METHOD_NAMES = {
    "base_question": "Base question",
    "base_question_trigger": "Base question w/ trigger",
    "twenty_questions": "20 questions",
    "twenty_questions_trigger": "20 questions w/ trigger",
    "generated_story": "Generated story",
    "dit": "DIT (ours)",
    "no_diff": "Control: no diff",
    "shuffled_diff": "Control: shuffled diff",
}
SCORERS = ["top1", "top5", "mrr", "answer_top1", "exact", "contains", "token_f1", "rouge_l", "slot_who",
           "slot_what", "slot_where", "slots_all", "judge_mean"]


def _cell(m: dict, key: str) -> str:
    if key not in m:
        return "–"
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{m[key]:.2f}"


def markdown_table(metrics: dict) -> str:
    """Methods as rows (paper order), scorers as columns, each 'mean [95% CI]'."""
    cols = [s for s in SCORERS if any(s in m for m in metrics.values())]
    lines = ["| method | " + " | ".join(cols) + " | n |", "|---" * (len(cols) + 2) + "|"]
    for method in [m for m in METHOD_NAMES if m in metrics] + [m for m in metrics if m not in METHOD_NAMES]:
        m = metrics[method]
        lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(_cell(m, c) for c in cols)
                     + f" | {m.get('n', '')} |")
    any_m = next(iter(metrics.values()), {})
    if "top1_chance" in any_m:
        lines.append(f"\nClosed-set chance: top-1 {any_m['top1_chance']:.3f}, top-5 "
                     f"{any_m.get('top5_chance', float('nan')):.3f}, MRR {any_m.get('mrr_chance', float('nan')):.3f}.")
    return "\n".join(lines) + "\n"


def subset_table(metrics: dict, scorers=("top1", "answer_top1", "token_f1", "slots_all")) -> str:
    """Per test subset (e.g. unseen combinations, unseen stories), each method's main scores; '' without subsets."""
    subsets = list(dict.fromkeys(k for m in metrics.values() for k in m.get("subsets", {})))
    if not subsets:
        return ""
    cols = [s for s in scorers if any(s in sub for m in metrics.values() for sub in m.get("subsets", {}).values())]
    lines = ["| method | subset | " + " | ".join(cols) + " | n |", "|---" * (len(cols) + 3) + "|"]
    for method in [m for m in METHOD_NAMES if m in metrics] + [m for m in metrics if m not in METHOD_NAMES]:
        for subset in subsets:
            m = metrics[method].get("subsets", {}).get(subset)
            if m:
                lines.append(f"| {METHOD_NAMES.get(method, method)} | {subset} | "
                             + " | ".join(_cell(m, c) for c in cols) + f" | {m.get('n', '')} |")
    return "\n".join(lines) + "\n"


def _num(v, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def confidence_table(conf: dict | None) -> str:
    """How sure DIT's answers are (metrics `dit.confidence`): area under accuracy-coverage, the unsure
    threshold and what it keeps on the test split, confident answers on out-of-distribution diffs; '' without."""
    if not conf:
        return ""
    lines = ["| area (acc. vs coverage) | threshold | test coverage | test accuracy kept | test confident wrong | "
             "n labels |", "|---" * 6 + "|",
             f"| {_num(conf.get('area'))} | {_num(conf.get('threshold'), '{:.3f}')} | {_num(conf.get('test_coverage'))} "
             f"| {_num(conf.get('test_accuracy_kept'))} | {_num(conf.get('test_confident_wrong'))} | "
             f"{conf.get('n_labels', '')} |", ""]
    null = conf.get("null_answer")  # the interpreter's no-behaviour answer, when it was trained with one
    head = ["out-of-distribution diffs", "n", "mean confidence", "confident (wrong) rate"]
    head += [f'answered "{null}"'] if null else []
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for kind, o in conf.get("ood", {}).items():
        lines.append(f"| {OOD_NAMES.get(kind, kind)} | {o['n']} | {_num(o['mean_confidence'])} | "
                     f"{_num(o['confident_wrong'])} |" + (f" {_num(o.get('answered_null'))} |" if null else ""))
    if not conf.get("calibrated"):
        note = ("\nNo unsure threshold recorded (an interpreter trained without validation diffs or before it was "
                "recorded): rates need one.\n")
    elif conf.get("threshold") is None:
        note = (f"\nNo unsure threshold: no set of validation answers reached accuracy {_num(conf.get('target'))}, so "
                "every answer is unsure. The label vocabulary is closed: a diff whose label was not in training (a "
                "new topic, a news story of its own) is never the best known label (docs/confidence.md).\n")
    else:
        note = ""
    return "\n".join(lines) + "\n" + note


OOD_NAMES = {"noise": "random noise, same per-module norm", "zero": "zero diff",
             "other_behavior": "another behaviour's test diffs"}


def behavior_tables(per_behavior: dict[str, dict]) -> str:
    """table.md: one behaviour's table as `markdown_table` (plus its subsets and DIT's confidence); several
    under a heading each."""
    parts = []
    for name, metrics in per_behavior.items():
        body = markdown_table(metrics)
        sub = subset_table(metrics)
        if sub:
            body += "\nBy test subset (how new each test diff is to the training split):\n\n" + sub
        conf = confidence_table(metrics.get("dit", {}).get("confidence"))
        if conf:
            body += ("\nConfidence of DIT's answers (best known label's probability; docs/confidence.md):\n\n"
                     + conf)
        parts.append(body if len(per_behavior) == 1 else f"## {name}\n\n{body}")
    return "\n".join(parts)


def plot_scores(metrics: dict, path: str | Path, scorers=("top1", "contains", "exact")) -> None:
    """Grouped bars with 95% CIs: one group per method, one bar per scorer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in METHOD_NAMES if m in metrics]
    x = np.arange(len(methods))
    w = 0.8 / len(scorers)
    fig, ax = plt.subplots(figsize=(10, 4))
    for k, s in enumerate(scorers):
        vals = [metrics[m].get(s, np.nan) for m in methods]
        ci = [metrics[m].get(f"{s}_ci", [v, v]) for m, v in zip(methods, vals)]
        err = np.array([[v - c[0] for v, c in zip(vals, ci)], [c[1] - v for v, c in zip(vals, ci)]])
        ax.bar(x + k * w, vals, w, yerr=err, capsize=3, label=s)
    chance = next(iter(metrics.values())).get("top1_chance")
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="top-1 chance")
    ax.set_xticks(x + w * (len(scorers) - 1) / 2, [METHOD_NAMES[m] for m in methods], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def plot_curves(csv_path: str | Path, path: str | Path) -> None:
    """Interpreter training curve (train and validation loss per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pl.read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(df["epoch"], df["train_loss"], marker="o", label="train")
    if df["val_loss"].drop_nulls().len():
        ax.plot(df["epoch"], df["val_loss"], marker="o", label="val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("label cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def plot_coverage(per_behavior: dict[str, dict], reports_dir: str | Path) -> None:
    """coverage.png (the first behaviour; coverage_<name>.png for the others): DIT's test accuracy of the
    most confident answers against the share kept, the unsure threshold's point, and confident answers
    on out-of-distribution diffs. Written in every case (a note when there is no confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for k, (name, metrics) in enumerate(per_behavior.items()):
        conf = metrics.get("dit", {}).get("confidence")
        fig, ax = plt.subplots(figsize=(6, 4))
        if conf and conf["curve"]["coverage"]:
            c = conf["curve"]
            ax.plot(c["coverage"], c["accuracy"], marker=".", label=f"test (area {conf['area']:.2f})")
            if conf.get("test_coverage") is not None and conf.get("test_accuracy_kept") is not None:
                ax.plot([conf["test_coverage"]], [conf["test_accuracy_kept"]], "o", color="red",
                        label=f"unsure threshold {conf['threshold']:.2f}")
            if conf.get("target") is not None:
                ax.axhline(conf["target"], color="grey", ls="--", lw=1, label="target val accuracy")
            ood = ", ".join(f"{kind} {o['confident_wrong']:.2f}" for kind, o in conf.get("ood", {}).items()
                            if o.get("confident_wrong") is not None)
            if ood:
                ax.set_title(f"confident on out-of-distribution diffs: {ood}", fontsize=8)
            ax.legend(fontsize=8, loc="lower left")
        else:
            ax.text(0.5, 0.5, "no confidence: DIT not evaluated or no label vocabulary", ha="center", va="center")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("coverage (share of test diffs answered, most confident first)")
        ax.set_ylabel("accuracy of the answers kept")
        fig.tight_layout()
        path = Path(reports_dir) / ("coverage.png" if k == 0 else f"coverage_{name}.png")
        save_figure_atomic(fig, path, dpi=110)
        plt.close(fig)
