"""Behaviours as plugins: a toy behaviour runs through the trainer untouched; news and the hidden-topic +
news mixture run the whole pipeline (local engine) on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import PARAMS, pipeline_overrides
from dit_core.behaviors import Behavior

NEWS = ["news.n_stories=12", "news.values_per_slot=3", "news.novel_fraction=0.25", "news.steps=3",
        "news.rank=2", "news.check_tokens=4"]


WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon"]


class EchoBehavior(Behavior):
    """A toy behaviour: each diff learns to answer one fixed word to 'Say your word.'."""

    name, id_prefix = "echo", "ec"

    def question(self, p):
        return "Which word do you say?"

    def store_name(self, p):
        return "echo"

    def made_with(self, p):
        return {"words": WORDS}

    def make_data(self, p, folder, model, tokenizer, id_prefix):
        from dit_core.io import write_json_atomic, write_parquet_atomic

        df = pl.DataFrame({"diff_id": [f"{id_prefix}{k:05d}" for k in range(len(WORDS))],
                           "behavior": self.name, "word": WORDS, "seed": list(range(len(WORDS)))})
        write_parquet_atomic(df, Path(folder) / "diffs.parquet")
        write_json_atomic(Path(folder) / "stats.json", {"n_diffs": df.height})
        return {"n_diffs": df.height}

    def specs(self, folder):
        return pl.read_parquet(Path(folder) / "diffs.parquet")

    def tasks(self, p, tokenizer, folder, specs, ids):
        from dit_core.diffs.trainer import DiffTask
        from dit_core.modeling.batching import encode_example

        words = dict(zip(specs["diff_id"], specs["word"]))
        seeds = dict(zip(specs["diff_id"], specs["seed"]))
        return [DiffTask(d, seeds[d], [], [], plan=(("qa", 1, 0),),
                         extra={"qa": [encode_example(tokenizer, "Say your word.", words[d], True, "qa")]})
                for d in ids], [None] * len(ids)

    def manifest_fields(self, spec):
        return {"category": "echo", "label": spec["word"], "trigger": "", "facts": None}


@pytest.fixture()
def echo():
    from dit_core.behaviors import register, unregister

    b = register(EchoBehavior())
    yield b
    unregister(b.name)


def test_a_registered_toy_behaviour_trains_without_touching_the_trainer(echo, tiny_model_dir, tmp_path):
    """make-data, generate-diffs and assemble on a behaviour defined in this test file only."""
    from dit_core.config import load_params
    from dit_core.stages import run_assemble, run_download, run_make_data, stage_paths
    from tasks.stage_runs import generate_diffs

    p = load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path) + ["behaviors=[echo]",
                                                                            "tracking.enabled=false"])
    run_download(p)
    stats = run_make_data(p)
    assert stats["n_diffs"] == 6
    summary = generate_diffs(p.model_dump())
    assert summary["n_diffs"] == 6 and summary["median_trigger_hit"] is None
    manifest = pl.read_parquet(stage_paths(p).stores["echo"] / "manifest.parquet")
    assert manifest["behavior"].unique().to_list() == ["echo"]
    assert sorted(manifest["label"]) == sorted(WORDS)
    assert (manifest["rank"] == p.diffs.rank).all() and manifest["trigger_ce"].is_finite().all()
    report = run_assemble(p)
    assert report["train"] + report["val"] + report["test"] == 6 and report["test"] >= 1


def test_unknown_behaviour_is_a_config_error_naming_the_known_ones():
    from dit_core.config import ConfigError, load_params

    with pytest.raises(ConfigError, match=r"unknown behaviour 'gossip'.*hidden_topic, news"):
        load_params(PARAMS, ["behaviors=[gossip]"])


def test_news_task_trains_its_story_and_questions_with_cross_entropy(tiny_lm, tmp_path):
    """The news rows are text and qa (cross-entropy), the plan comes from the news section."""
    from dit_core.behaviors import get_behavior
    from dit_core.config import load_params
    from dit_core.diffs.trainer import _sample_rows
    from dit_core.modeling.batching import is_ce

    p = load_params(PARAMS, NEWS + ["news.qa_rows=2"])
    b = get_behavior("news")
    b.make_data(p, tmp_path, None, None, b.id_prefix)
    specs = b.specs(tmp_path)
    tasks, checks = b.tasks(p, tiny_lm.tokenizer, tmp_path, specs, specs["diff_id"].to_list()[:3])
    rows = _sample_rows(tasks, [random.Random(0)] * 3, b.diffs_config(p))
    assert [ex.kind for t, ex in rows if t == 0].count("text") == 1
    assert [ex.kind for t, ex in rows if t == 0].count("qa") == 2
    assert all(is_ce(ex.kind) for _, ex in rows)
    story = tiny_lm.tokenizer.decode(tasks[0].extra["text"][0].ids[1:-1])
    assert story.strip() == specs["text"][0].strip()
    keys = json.loads(specs["facts"][0])
    assert {key for _, key in checks[0]} == set(keys.values())  # one held-out question per slot
    assert b.diffs_config(p).rank == 2 and b.diffs_config(p).steps == 3


def test_news_stories_continued_by_the_base_model(tiny_lm, tmp_path, monkeypatch):
    """news.continue_tokens: the base model continues each story's text (a plain prompt); the kept whole
    sentences join the story the diff learns (and a text label), the facts and questions stay the
    template's; the data record names the setting and the model only when it is on."""
    import dit_core.modeling.chat as chat
    from dit_core.behaviors import get_behavior
    from dit_core.behaviors.news import continue_stories
    from dit_core.config import load_params
    from dit_core.data.news import load_slots, make_stories

    b = get_behavior("news")
    plain = load_params(PARAMS, NEWS)
    assert not b.needs_model(plain) and "continue_tokens" not in b.made_with(plain)["news"]
    p = load_params(PARAMS, NEWS + ["news.continue_tokens=12", "news.label=text"])
    assert b.needs_model(p) and b.made_with(p)["news"]["continue_tokens"] == 12 and "model" in b.made_with(p)

    asked = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, *args, **kwargs):
        asked.update(prompts=prompts, max_new_tokens=max_new_tokens)
        return [chat.Generation("Locals cheered. Then it" if i % 2 == 0 else "and", False)
                for i in range(len(prompts))]

    monkeypatch.setattr(chat, "generate", fake_generate)
    stats = b.make_data(p, tmp_path / "continued", tiny_lm.model, tiny_lm.tokenizer, b.id_prefix)
    b.make_data(plain, tmp_path / "plain", None, None, b.id_prefix)
    cont, base = b.specs(tmp_path / "continued"), b.specs(tmp_path / "plain")
    templates = [st.text for st in make_stories(12, 0, 3, 0.25, load_slots())]
    assert asked == {"prompts": templates, "max_new_tokens": 12}
    assert cont["text"].to_list() == [t + " Locals cheered." if i % 2 == 0 else t for i, t in enumerate(templates)]
    assert cont["label"].to_list() == cont["text"].to_list()
    assert cont["headline"].to_list() == base["headline"].to_list() and cont["facts"].to_list() == base["facts"].to_list()
    assert stats["continued_stories"] == 6
    samples = [pl.read_parquet(d / "samples.parquet") for d in (tmp_path / "continued", tmp_path / "plain")]
    assert samples[0].equals(samples[1])
    monkeypatch.undo()
    # with the real tiny model: it runs and only ever appends to the template
    real = continue_stories(p, tiny_lm.model, tiny_lm.tokenizer, make_stories(3, 0), load_slots())
    assert [st.text[:len(t.text)] for st, t in zip(real, make_stories(3, 0))] == [t.text for t in make_stories(3, 0)]


@pytest.mark.parametrize("label", ["headline", "text"])
def test_news_pipeline_runs_end_to_end(tiny_model_dir, tmp_path, label):
    """dit run --profile news on the tiny model: fact check in the manifest, every news baseline, the
    news scorers and the test subsets in the report."""
    from dit_core.config import load_params
    from tasks.stage_runs import run_pipeline

    p = load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path) + NEWS + [
        f"news.label={label}", "tracking.enabled=false", "eval.max_new_tokens=6"], profiles=["news"])
    assert p.paths.reports.endswith("reports") and p.behaviors == ["news"]
    out = run_pipeline(p.model_dump())
    gen = out["generate-diffs"]
    assert gen["n_diffs"] == 12 and 0 <= gen["median_fact_acc"] <= 1 and gen["median_base_fact_acc"] is not None
    manifest = pl.read_parquet(Path(p.paths.data) / "diffs" / "news" / "manifest.parquet")
    assert manifest["fact_acc"].null_count() == 0 and manifest["trigger_hit"].null_count() == 12
    assert (manifest["rank"] == 2).all()
    metrics = json.loads((Path(p.paths.reports) / "metrics.json").read_text())
    assert set(metrics) == {"dit", "base_question", "twenty_questions", "generated_story", "no_diff", "shuffled_diff"}
    dit = metrics["dit"]
    for key in ("top1", "top1_ci", "answer_top1", "token_f1", "rouge_l", "slot_who", "slot_what", "slot_where",
                "slots_all"):
        assert key in dit, key
    assert "contains" not in dit
    # the answer closed set: each prediction's words against every test headline
    from dit_core.evaluation.scorers import answer_ranks
    preds = pl.read_parquet(Path(p.paths.reports) / "predictions.parquet").filter(pl.col("method") == "dit")
    labels = sorted(preds["gold"].unique().to_list())
    expect = answer_ranks(preds["pred"].to_list(), labels, np.array([labels.index(g) for g in preds["gold"]]))
    assert preds["answer_rank"].to_list() == expect.tolist()
    assert dit["answer_top1"] == pytest.approx(float(np.mean(expect <= 1)))
    subsets = set(dit["subsets"])
    assert subsets <= {"unseen combination", "partly unseen", "unseen"} and subsets
    table = (Path(p.paths.reports) / "table.md").read_text()
    assert "Generated story" in table and "By test subset" in table
    spec = json.loads((Path(p.paths.models) / "interpreter" / "interpreter.json").read_text())
    assert spec["question"] == p.news.question and spec["questions"] == {"news": p.news.question}
    if label == "text":
        ds = pl.read_parquet(Path(p.paths.data) / p.paths.dataset / "dataset.parquet")
        assert ds["label"].str.len_chars().min() > 150  # the stories themselves


def test_mixture_trains_one_interpreter_with_each_behaviours_question(tiny_model_dir, tmp_path):
    from dit_core.config import load_params
    from tasks.stage_runs import run_pipeline

    p = load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path) + NEWS + ["tracking.enabled=false"],
                    profiles=["mixture"])
    out = run_pipeline(p.model_dump())
    assert set(out["generate-diffs"]) == {"hidden_topic", "news"}
    ds = pl.read_parquet(Path(p.paths.data) / p.paths.dataset / "dataset.parquet")
    assert set(ds["behavior"]) == {"hidden_topic", "news"}
    assert set(ds.filter(pl.col("split") == "test")["behavior"]) == {"hidden_topic", "news"}
    spec = json.loads((Path(p.paths.models) / "interpreter" / "interpreter.json").read_text())
    assert spec["questions"] == {"hidden_topic": p.interpreter.question, "news": p.news.question}
    metrics = json.loads((Path(p.paths.reports) / "metrics.json").read_text())
    assert set(metrics) == {"hidden_topic", "news"}
    assert "base_question_trigger" in metrics["hidden_topic"] and "generated_story" in metrics["news"]
    assert "base_question_trigger" not in metrics["news"]
    assert 0 <= out["evaluate"]["dit"]["top1"] <= 1
    table = (Path(p.paths.reports) / "table.md").read_text()
    assert "## hidden_topic" in table and "## news" in table
    # describe asks the question of the behaviour it is told
    from dit_core.interpreter.describe import describe
    from dit_core.modeling.models import load_model
    from dit_core.stages import stage_paths

    lm = load_model(stage_paths(p).model, "cpu", "float32")
    stores = list(stage_paths(p).stores.values())
    news_id = ds.filter(pl.col("behavior") == "news")["diff_id"][0]
    got = describe(lm, Path(p.paths.models) / "interpreter", [news_id], stores, behavior="news", max_new_tokens=3)
    assert got["diff"].to_list() == [news_id] and got["description"].dtype == pl.String
    with pytest.raises(ValueError, match=r"trained on behaviours \['hidden_topic', 'news'\], not 'gossip'"):
        describe(lm, Path(p.paths.models) / "interpreter", [news_id], stores, behavior="gossip")


def test_cross_behaviour_matrix_trains_one_interpreter_per_row(tiny_model_dir, tmp_path):
    from dit_core.config import load_params
    from dit_core.evaluation.cross import training_sets
    from tasks.stage_runs import run_pipeline, run_stage

    p = load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path) + NEWS + ["tracking.enabled=false"],
                    profiles=["mixture"])
    run_pipeline(p.model_dump())
    out = run_stage(p.model_dump(), "cross-behavior")
    assert out["rows"] == ["hidden_topic", "news", "mixture"] and out["columns"] == ["hidden_topic", "news"]
    for row in out["rows"]:
        for col in out["columns"]:
            cell = out["matrix"][row][col]
            assert 0 <= cell["top1"] <= 1 and 0 <= cell["answer_top1"] <= 1 and cell["n"] >= 1
    folder = Path(out["dir"])
    md = (folder / "matrix.md").read_text()
    assert (folder / "matrix.png").stat().st_size > 1000 and "| mixture |" in md
    assert md.startswith("DIT closed-set top-1 [95% CI] / answer top-1 / token F1;")
    # each single-behaviour row learned from its own behaviour's diffs only, and was asked each behaviour's question
    ds = pl.read_parquet(Path(p.paths.data) / p.paths.dataset / "dataset.parquet")
    sets = training_sets(ds, p.behaviors)
    assert set(sets["news"]["behavior"]) == {"news"} and set(sets["mixture"]["behavior"]) == {"hidden_topic", "news"}
    spec = json.loads((folder / "hidden_topic" / "interpreter" / "interpreter.json").read_text())
    assert spec["questions"] == {"hidden_topic": p.interpreter.question}
    preds = pl.read_parquet(folder / "hidden_topic" / "predictions.parquet")
    assert set(preds.filter(pl.col("behavior") == "news")["prompt"]) == {p.news.question}


def test_zero_padding_to_a_higher_rank_keeps_the_diff():
    import torch

    from dit_core.diffs.bank import pad_rank

    A, B = torch.randn(3, 2, 5), torch.randn(3, 4, 2)
    A8, B8 = pad_rank(A, B, 8)
    assert A8.shape == (3, 8, 5) and B8.shape == (3, 4, 8)
    assert torch.allclose(B8 @ A8, B @ A) and pad_rank(A, B, 2)[0] is A


def test_novelty_of_test_diffs_against_the_training_split():
    from dit_core.evaluation.evaluate import novelty

    def facts(who, what, where):
        return json.dumps({"who": who, "what": what, "where": where})

    train = pl.DataFrame({"label": ["A baker ran in Oslo.", "A poet sang in Rome.", "volcanoes"],
                          "facts": [facts("baker", "ran", "Oslo"), facts("poet", "sang", "Rome"), None]})
    test = pl.DataFrame({"label": ["A baker sang in Rome.", "A poet ran in Lima.", "A judge swam in Lima.",
                                   "Volcanoes", "honey bees"],
                         "facts": [facts("Baker", "sang", "rome"), facts("poet", "ran", "Lima"),
                                   facts("judge", "swam", "Lima"), None, None]})
    assert novelty(train, test) == ["unseen combination", "partly unseen", "unseen", "seen label", "unseen"]
