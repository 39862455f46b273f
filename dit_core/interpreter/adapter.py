"""The interpreter (the paper's DIT adapter): a shared LoRA that makes base + diff say what the diff does.

    base model + weight diff (frozen, factored, one per batch row) + interpreter LoRA
    asked `question` in the usual chat format  ->  answers the diff's label

Saved as `interpreter.safetensors` (`<module>.A: [r, out]`, `<module>.B: [in, r]`, same convention as
diffs) plus `interpreter.json` (kind, rank, alpha, question, base model and hash, data version).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_core.modeling.chat import chat_prompt, generate, inference_batch
from dit_core.modeling.batching import Example, answer_logprobs, diff_losses, encode_example
from dit_core.io import atomic_path, read_json_object, write_json_atomic
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import check_recorded_sha256, sha256_file

WEIGHTS = "interpreter.safetensors"
SPEC = "interpreter.json"
WEIGHTS_SHA256 = "weights_sha256"


class InterpreterFileError(ValueError):
    """An interpreter directory is missing, corrupt, or made for another base model."""


@dataclass
class InterpreterSpec:
    """What an interpreter is and what it was trained on."""

    kind: str
    question: str
    rank: int
    alpha: float
    modules: str
    base_model: str
    base_sha256: str
    data_version: str = ""
    n_soft_tokens: int = 0
    projection_hidden: int = 0
    projection_lora: bool = False
    questions: dict[str, str] | None = None  # behaviour -> its question (None: `question` for all)
    # Recorded when training ends (dit_core.interpreter.confidence); None in interpreters saved before:
    labels: dict[str, list[str]] | None = None  # behaviour -> its training labels (confidence vocabulary)
    calibration: dict[str, dict] | None = None  # behaviour -> unsure threshold chosen on val
    # The answer it was trained to give on a diff with no behaviour (rows of the zero diff), and how many
    # such rows per training diff; None / 0 in interpreters trained without them.
    null_answer: str | None = None
    null_rate: float = 0.0

    def question_for(self, behavior: str | None, unknown: str | None = None) -> str:
        """The question asked about a diff of `behavior`: the one it was trained with; for a behaviour the
        spec lacks, `unknown` (default `question`); a spec without per-behaviour questions: `question`."""
        if not behavior or self.questions is None:
            return self.question
        return self.questions.get(behavior, unknown or self.question)


def label_example(tokenizer, question: str, label: str) -> Example:
    """Prompt = the question in chat format; target = the label and end of turn."""
    return encode_example(tokenizer, question, label, True, "trigger")


class LoraInterpreter:
    """A shared rank-r LoRA on every adapted linear layer, trained on top of per-row diffs."""

    def __init__(self, dm: DiffModel, spec: InterpreterSpec, tokenizer=None, init_std: float = 0.02):
        self.dm, self.spec = dm, spec
        self.params = dm.attach_adapter(spec.rank, spec.alpha, init_std)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def _label_ce(self, A, B, scale, examples: list[Example], pad_id: int):
        # Row b carries diff b (A=None: no diff); returns (summed CE, per-row CE).
        if A is None:
            self.dm.clear_diffs()
        else:
            self.dm.set_diffs(A, B, scale=scale)
        loss, parts = diff_losses(self.dm, list(enumerate(examples)), len(examples), 0.0, pad_id)
        return loss, parts["ce"]

    @torch.no_grad()
    def row_losses(self, A, B, scale, examples: list[Example], pad_id: int) -> torch.Tensor:
        """Cross-entropy on the label tokens, one value per row (row b carries diff b)."""
        return self._label_ce(A, B, scale, examples, pad_id)[1]

    def loss_with_grad(self, A, B, scale, examples: list[Example], pad_id: int) -> torch.Tensor:
        """Mean label cross-entropy with a graph for backward."""
        return self._label_ce(A, B, scale, examples, pad_id)[0] / len(examples)

    @torch.no_grad()
    def describe(self, tokenizer, diffs, rows: list[int], max_new_tokens: int = 16,
                 question: str | None = None) -> list[str]:
        """Greedy answers to the question; output row i uses diff rows[i] of diffs=(A, B, scale), or none."""
        prompt = chat_prompt(tokenizer, question or self.spec.question)
        try:
            if diffs is not None:
                self.dm.set_diffs(*diffs[:2], scale=diffs[2])
            gens = generate(self.dm.model, tokenizer, [prompt] * len(rows), max_new_tokens, inference_batch(self.dm.model),
                            rows=rows if diffs is not None else None, set_rows=self.dm.set_row_index)
        finally:
            self.dm.clear_diffs()
        return [g.text for g in gens]

    @torch.no_grad()
    def label_logprobs(self, diffs, rows: list[int], examples: list[Example], pad_id: int) -> torch.Tensor:
        """Total log-probability of each example's answer; example i uses diff rows[i] (or no diff)."""
        try:
            if diffs is not None:
                self.dm.set_diffs(*diffs[:2], scale=diffs[2])
            return answer_logprobs(self.dm, list(zip(rows, examples)), pad_id)
        finally:
            self.dm.clear_diffs()

    def state(self) -> dict[str, torch.Tensor]:
        return self.dm.adapter_state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, layer in self.dm.layers.items():
            layer.adapter_A.data.copy_(state[f"{name}.A"])
            layer.adapter_B.data.copy_(state[f"{name}.B"])


def save_interpreter(out_dir: str | Path, spec: InterpreterSpec, state: dict[str, torch.Tensor]) -> None:
    """Write weights then spec, each atomically (the spec is written last: it marks completeness)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().float().contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"format": "dit-interpreter/1", "spec": json.dumps(asdict(spec))})
    # the weights' sha256, checked before they are read (a flipped byte is refused, naming the file)
    write_json_atomic(out_dir / SPEC, asdict(spec) | {WEIGHTS_SHA256: sha256_file(out_dir / WEIGHTS)})


def check_file_sha256(path: Path, recorded: str, fix: str) -> None:
    """Refuse a file whose sha256 is not the one recorded when it was written."""
    check_recorded_sha256(path, recorded, fix, InterpreterFileError)


MAX_QUESTION_CHARS = 1000  # a question is a sentence; a prompt past the model's context would run for hours
MAX_LABEL_CHARS = 4000  # labels include news stories (news.label: text)


def _check_spec_text(where: Path, spec: InterpreterSpec) -> None:
    """Questions and labels of a spec someone else may have written: strings, no control characters, of a
    sentence's (a story's) length."""
    from dit_core.data.topics import DataFileError, check_text

    texts = [("question", spec.question, MAX_QUESTION_CHARS)]
    texts += [(f"questions.{b}", q, MAX_QUESTION_CHARS) for b, q in (spec.questions or {}).items()]
    texts += [(f"labels.{b}", lab, MAX_LABEL_CHARS) for b, labs in (spec.labels or {}).items() for lab in labs]
    texts += [("null_answer", spec.null_answer, MAX_LABEL_CHARS)] if spec.null_answer is not None else []
    for key, text, limit in texts:
        if not isinstance(text, str):
            raise InterpreterFileError(f"{where}: {key} is a {type(text).__name__}, not a string; retrain or re-download it")
        if len(text) > limit:
            raise InterpreterFileError(f"{where}: {key} is {len(text)} characters long (at most {limit}): "
                                       f"{text[:60]!r}...; retrain or re-download the interpreter")
        try:
            check_text(text, f"{where}: {key}")
        except DataFileError as e:
            raise InterpreterFileError(str(e)) from None


def read_interpreter(path: str | Path, base_sha256: str | None = None) -> tuple[InterpreterSpec, dict[str, torch.Tensor]]:
    """Read and validate an interpreter directory."""
    path = Path(path)
    if not (path / SPEC).is_file() or not (path / WEIGHTS).is_file():
        raise InterpreterFileError(f"{path}: no interpreter here ({SPEC} and {WEIGHTS} expected); "
                                   "run `dit stage train-interpreter` or pass --interpreter")
    record = read_json_object(path / SPEC, InterpreterFileError, "interpreter spec", "retrain or re-download it")
    try:
        recorded_sha = record.pop(WEIGHTS_SHA256, None)  # absent in interpreters saved before it was recorded
        spec = InterpreterSpec(**record)
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise InterpreterFileError(f"{path / SPEC}: not an interpreter spec ({e}); retrain or re-download it") from e
    _check_spec_text(path / SPEC, spec)
    if recorded_sha is not None:
        check_file_sha256(path / WEIGHTS, recorded_sha, "retrain (`dit stage train-interpreter`) or re-download it")
    if base_sha256 and spec.base_sha256 != base_sha256:
        raise InterpreterFileError(f"{path}: trained on base model {spec.base_model} "
                                   f"({spec.base_sha256[:12]}…), not the loaded one ({base_sha256[:12]}…)")
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise InterpreterFileError(f"{path / WEIGHTS}: unreadable ({e}); retrain or re-download it") from e
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise InterpreterFileError(f"{path / WEIGHTS}: NaN/Inf in {bad[:3]}")
    return spec, state


def build_interpreter(dm: DiffModel, spec: InterpreterSpec, tokenizer, init_std: float = 0.02):
    """The interpreter object for `spec.kind`, attached to the wrapped model."""
    if spec.kind == "lora":
        return LoraInterpreter(dm, spec, tokenizer, init_std)
    if spec.kind == "projection":
        from dit_core.interpreter.projection import ProjectionInterpreter

        return ProjectionInterpreter(dm, spec, tokenizer, init_std)
    raise ValueError(f"interpreter.kind={spec.kind!r}: expected 'lora' or 'projection'")


def load_interpreter(dm: DiffModel, path: str | Path, tokenizer, base_sha256: str | None = None):
    """Attach a saved interpreter to a wrapped model (frozen)."""
    spec, state = read_interpreter(path, base_sha256)
    interp = build_interpreter(dm, spec, tokenizer)
    missing = set(interp.state()) - set(state)
    if missing:
        raise InterpreterFileError(f"{path}: weights lack {sorted(missing)[:3]}; modules differ from the model")
    interp.load_state(state)
    for prm in interp.parameters():
        prm.requires_grad_(False)
    return interp
