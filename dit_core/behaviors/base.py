"""The behaviour interface: what a kind of weight diff learns, how its diffs are trained, checked, asked
about and evaluated. A behaviour is a plugin: register it by name and the pipeline makes, trains,
assembles, interprets and evaluates its diffs without other changes.

    class MyBehavior(Behavior):
        name = "my_behavior"
        ...
    register(MyBehavior())
    # params.yaml:  behaviors: [hidden_topic, my_behavior]

Its data lives in `<paths.data>/behaviors/<name>/` (at least `diffs.parquet` with `diff_id` and `seed`
columns, and `stats.json`), its diffs in the store `<paths.data>/diffs/<store_name(p)>/`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

if TYPE_CHECKING:
    from dit_core.config import DiffsConfig, Params
    from dit_core.diffs.trainer import DiffTask
    from dit_core.evaluation.evaluate import Evaluator
    from dit_core.modeling.lora import DiffModel

@dataclass
class Query:
    """How one evaluation method asks about one test item."""

    prompt: str  # user message
    diff: int | None  # index of the test diff to apply, or None
    adapter: bool  # interpreter on


# Evaluation methods every behaviour answers (the interpreter, the base model asked directly, controls).
COMMON_METHODS = ("dit", "base_question", "no_diff", "shuffled_diff")


class Behavior(ABC):
    """One kind of behaviour a weight diff can learn."""

    name: ClassVar[str]
    # Diff ids are `<id_prefix><5 digits>`: distinct prefixes keep the stores of a mixture apart.
    id_prefix: ClassVar[str]
    # Evaluation methods beyond COMMON_METHODS that `queries` builds (eval.methods picks among them).
    baselines: ClassVar[tuple[str, ...]] = ()
    # Free-text scorers (dit_core.evaluation.scorers.TEXT_SCORERS) of its answers.
    text_scorers: ClassVar[tuple[str, ...]] = ("exact", "contains", "token_f1")
    # LLM-judge rubric (dit_core.evaluation.scorers.JUDGE_RUBRICS) when eval.judge.rubric is auto.
    judge_rubric: ClassVar[str] = "topic"
    # Files make_data writes; a rerun with the same settings finds them and does nothing.
    data_files: ClassVar[tuple[str, ...]] = ("diffs.parquet", "stats.json")

    # -- configuration -------------------------------------------------------------------------
    @abstractmethod
    def question(self, p: Params) -> str:
        """What the interpreter is asked about a diff of this behaviour."""

    def diffs_config(self, p: Params) -> DiffsConfig:
        """The diff-training recipe of this behaviour (default: the diffs section)."""
        return p.diffs

    def store_name(self, p: Params) -> str:
        """Name of its diff store: `<paths.data>/diffs/<name>/`."""
        return f"{p.diffs.run}-{self.name}"

    @abstractmethod
    def made_with(self, p: Params) -> dict:
        """What its data depends on: a change regenerates the data."""

    def needs_model(self, p: Params) -> bool:
        """Whether make_data needs the base model (e.g. to distil answers)."""
        return False

    # -- data ----------------------------------------------------------------------------------
    @abstractmethod
    def make_data(self, p: Params, folder: Path, model, tokenizer, id_prefix: str) -> dict:
        """Write the behaviour data into `folder`; returns stats (n_diffs at least)."""

    @abstractmethod
    def specs(self, folder: Path) -> pl.DataFrame:
        """The validated diffs.parquet of `folder`: one row per diff, `diff_id` and `seed` at least."""

    # -- diffs ---------------------------------------------------------------------------------
    @abstractmethod
    def tasks(self, p: Params, tokenizer, folder: Path, specs: pl.DataFrame, ids: list[str]
              ) -> tuple[list[DiffTask], list[Any]]:
        """Training tasks of the diffs `ids` (in that order) and what `check` needs for each."""

    def check(self, p: Params, dm: DiffModel, tokenizer, checks: list[Any], A, B, scale: float
              ) -> list[dict]:
        """Per diff, behaviour-check columns of the manifest (e.g. trigger_hit, fact_acc); none by default."""
        return [{} for _ in checks]

    @abstractmethod
    def manifest_fields(self, spec: dict) -> dict:
        """Manifest columns of one diff from its spec row: category, label, trigger and facts (JSON or None)."""

    # -- evaluation ----------------------------------------------------------------------------
    def heldout_questions(self, questions_path: Path | None) -> list[str]:
        """Generic questions the 20-questions baseline asks a diff (none by default)."""
        return []

    def queries(self, ev: Evaluator, method: str) -> list[Query]:
        """The queries of one of `baselines`, one per test item of `ev`."""
        raise ValueError(f"behaviour {self.name!r} has no evaluation method {method!r}")

    @property
    def methods(self) -> tuple[str, ...]:
        return COMMON_METHODS + self.baselines
