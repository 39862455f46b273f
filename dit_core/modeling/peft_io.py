"""PEFT interop: a PEFT LoRA adapter directory <-> a weight diff in this project's convention.

PEFT stores lora_A: [r, in], lora_B: [out, r] with delta_W = lora_B @ lora_A * (alpha / r)
(alpha / sqrt(r) with rsLoRA; r and alpha per module with rank_pattern / alpha_pattern). Here B: [in, r],
A: [r, out], delta_W = (B @ A)^T * scale, so B = lora_A^T, A = lora_B^T and the scale is kept. Modules the
adapter does not touch get zero factors; modules of lower rank are zero-padded to the adapter's highest
rank (the same diff). Adapters whose forward is not `W + B A * scale` on linear layers are refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_core.diffs.bank import pad_rank
from dit_core.diffs.store import DiffFileError, DiffShard, check_sha256, check_shard
from dit_core.io import atomic_dir, read_json_object, write_json_atomic
from dit_core.modeling.models import sha256_file

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"\.lora_embedding_[AB]\b")

SUPPORTED = ("supported: LoRA and rsLoRA adapters (peft_type LORA) on the decoder's linear layers, with any "
             "rank and alpha (rank_pattern / alpha_pattern included) and any subset of modules")

# Config settings under which PEFT's forward is not base + lora_B @ lora_A * scale on linear layers:
# (key, is it set?, what it is).
_REFUSED = [
    ("use_dora", bool, "DoRA (weight-decomposed LoRA: a learned magnitude rescales the weight)"),
    ("lora_bias", bool, "a trained bias on lora_B"),
    ("bias", lambda v: v not in (None, "none"), "trained biases of the base layers"),
    ("modules_to_save", bool, "fully trained copies of modules (modules_to_save)"),
    ("trainable_token_indices", bool, "trained embedding rows (trainable_token_indices)"),
    ("layer_replication", bool, "replicated decoder layers (layer_replication)"),
    ("alora_invocation_tokens", bool, "activated LoRA (alora_invocation_tokens)"),
    ("target_parameters", bool, "LoRA on raw parameters (target_parameters)"),
    ("use_bdlora", bool, "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", bool, "Arrow routing over several LoRAs (arrow_config)"),
    ("kasa_config", bool, "KaSA (changes the base weights and adds lora_diag)"),
    ("monteclora_config", bool, "MonteCLoRA (sampled adapters)"),
    ("use_qalora", bool, "QA-LoRA (pooled inputs)"),
]
# Initialisations that change the base weights themselves: the adapter is a diff of a modified base.
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _recorded_base(cfg: dict) -> str | None:
    """The base model an adapter records (`base_model_name_or_path`), as a bare lower-case name."""
    name = cfg.get("base_model_name_or_path")
    return Path(str(name).rstrip("/")).name.lower() if name else None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key
    that matches the end of the module name (after a dot), else the default."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise DiffFileError(f"rank_pattern / alpha_pattern key {key!r} is not a regular expression ({e})") from None
    return default


def _check_supported(adapter_dir: Path, cfg: dict) -> None:
    """Refuse adapters that are not plain (rs)LoRA on linear layers, naming what was found."""
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise DiffFileError(f"{adapter_dir}: peft_type={peft_type!r} is not a LoRA adapter; {SUPPORTED}")
    for key, is_set, what in _REFUSED:
        value = cfg.get(key)
        if value is not None and is_set(value):
            raise DiffFileError(f"{adapter_dir}: adapter_config.json has {key}={value!r}: {what}, which is not "
                                f"a weight diff of the base model's linear layers; {SUPPORTED}")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INIT):
        raise DiffFileError(
            f"{adapter_dir}: init_lora_weights={cfg['init_lora_weights']!r} changes the base weights, so this "
            "adapter is a diff of a modified base model; save it with PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...) to get a plain LoRA of the original base, then import "
            f"that; {SUPPORTED}")


def _read_config(adapter_dir: Path) -> tuple[dict, int, float, dict, dict]:
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = read_json_object(cfg_path, DiffFileError, "PEFT adapter config",
                           "expected JSON with peft_type, r and lora_alpha")
    _check_supported(adapter_dir, cfg)  # before reading r: other adapter types have none
    try:
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
        rank_pattern, alpha_pattern = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
        rank_pattern = {k: int(v) for k, v in rank_pattern.items()}
        alpha_pattern = {k: float(v) for k, v in alpha_pattern.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise DiffFileError(f"{cfg_path}: not a readable PEFT adapter config ({type(e).__name__}: {e}); "
                            "expected JSON with peft_type, r and lora_alpha") from None
    bad = [f"{k}={v}" for k, v in {"r": r, **rank_pattern}.items() if v < 1]
    bad += [f"{k}={v}" for k, v in {"lora_alpha": alpha, **alpha_pattern}.items() if not math.isfinite(v)]
    if bad:
        raise DiffFileError(f"{cfg_path}: ranks must be >= 1 and alphas finite; found {', '.join(bad[:3])}")
    return cfg, r, alpha, rank_pattern, alpha_pattern


EXPORT_RECORD = "dit_export.json"  # beside an adapter `export_peft` wrote: its weights' sha256


def check_export_record(adapter_dir: Path) -> None:
    """An adapter this project exported records its weights' sha256: refuse it if the file changed since."""
    path = adapter_dir / EXPORT_RECORD
    if path.is_file():
        fix = "export it again with `dit export-peft`"
        rec = read_json_object(path, DiffFileError, "export record", fix)
        if not isinstance(rec.get("weights_sha256"), str):
            raise DiffFileError(f"{path}: no weights_sha256; {fix}")
        check_sha256(adapter_dir / "adapter_model.safetensors", rec["weights_sha256"], fix)


def import_peft(adapter_dir: str | Path, shapes: dict[str, tuple[int, int]], base_model: str,
                base_sha256: str, any_base: bool = False) -> DiffShard:
    """Read a PEFT LoRA adapter (safetensors) as a one-diff shard covering every wrapped module.

    Any rank and lora_alpha, rsLoRA, per-module rank_pattern / alpha_pattern and any subset of the wrapped
    modules are read (the shard's rank is the adapter's highest; where modules' scales differ they are
    folded into A and the shard's scale is 1). DoRA, other PEFT types, trained biases, modules_to_save,
    embedding LoRA and other variants whose forward is not base + LoRA are refused, naming what was found.
    An adapter whose adapter_config.json records another base model (by name: a hub id's or a directory's
    last part) is refused unless `any_base`: the interpreter reads diffs of the base it was trained on.
    """
    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise DiffFileError(f"{adapter_dir}: no adapter_config.json; is this a PEFT adapter directory?")
    if not weights.is_file():
        extra = " (pickled adapter_model.bin is refused: convert it to safetensors)" if (
            adapter_dir / "adapter_model.bin").exists() else ""
        raise DiffFileError(f"{adapter_dir}: no adapter_model.safetensors{extra}")
    check_export_record(adapter_dir)
    cfg, r, alpha, rank_pattern, alpha_pattern = _read_config(adapter_dir)
    recorded = _recorded_base(cfg)
    if recorded and recorded != base_model.lower() and not any_base:
        raise DiffFileError(f"{cfg_path}: the adapter was trained on base model {cfg['base_model_name_or_path']!r}, "
                            f"not the loaded {base_model!r}; load that base model, or pass --any-base if it is the "
                            "same model under another name")
    found: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            embedding = [k for k in keys if _EMBEDDING_KEY.search(k)]
            if embedding:
                raise DiffFileError(f"{weights}: embedding-layer LoRA ({embedding[0]}) is not a diff of a linear "
                                    f"layer; {SUPPORTED}")
            other = [k for k in keys if not _KEY.match(k)]
            for key in keys:
                m = _KEY.match(key)
                if m:
                    found.setdefault(m["module"], {})[m["which"]] = f.get_tensor(key).float()
    except DiffFileError:
        raise
    except Exception as e:  # a pickle or a truncated file under the safetensors name
        raise DiffFileError(f"{weights}: not a readable safetensors file ({e}); save the adapter with "
                            "safe_serialization=True") from e
    unknown = sorted(set(found) - set(shapes))
    if unknown:
        raise DiffFileError(f"{adapter_dir}: adapter targets {len(unknown)} modules that are not among the base "
                            f"model's wrapped decoder linear layers (diffs.modules), e.g. {unknown[:3]}; {SUPPORTED}")
    if other:
        raise DiffFileError(f"{weights}: {len(other)} tensors that are not LoRA factors, e.g. {other[0]} "
                            f"(a DoRA magnitude, a bias or a saved module?); {SUPPORTED}")
    if not found:
        raise DiffFileError(f"{weights}: no lora_A/lora_B tensors found")
    rsl = bool(cfg.get("use_rslora"))
    ranks = {m: int(_pattern_value(rank_pattern, m, r)) for m in found}
    scales = {m: float(_pattern_value(alpha_pattern, m, alpha)) / (math.sqrt(ranks[m]) if rsl else ranks[m])
              for m in found}
    rank = max(ranks.values())
    uniform = len(set(scales.values())) == 1
    scale = next(iter(scales.values())) if uniform else 1.0
    A, B = {}, {}
    for name, (fan_in, fan_out) in shapes.items():
        pair = found.get(name)
        if pair is None:
            A[name], B[name] = torch.zeros(1, rank, fan_out), torch.zeros(1, fan_in, rank)
            continue
        la, lb, rm = pair.get("A"), pair.get("B"), ranks[name]
        if la is None or lb is None:
            raise DiffFileError(f"{adapter_dir}: {name} lacks lora_{'A' if la is None else 'B'}")
        if tuple(la.shape) != (rm, fan_in) or tuple(lb.shape) != (fan_out, rm):
            raise DiffFileError(f"{adapter_dir}: {name} has lora_A{tuple(la.shape)} lora_B{tuple(lb.shape)}, "
                                f"expected lora_A{(rm, fan_in)} lora_B{(fan_out, rm)} (rank {rm} from "
                                "adapter_config.json r / rank_pattern)")
        if not (torch.isfinite(la).all() and torch.isfinite(lb).all()):
            raise DiffFileError(f"{adapter_dir}: {name} contains NaN or Inf")
        a = lb.T if uniform else lb.T * scales[name]
        a, b = pad_rank(a.unsqueeze(0), la.T.unsqueeze(0), rank)
        A[name], B[name] = a.contiguous(), b.contiguous()
    return check_shard(adapter_dir, DiffShard(A, B, base_model, base_sha256, rank, scale, [adapter_dir.name]))


def export_peft(shard: DiffShard, row: int, out_dir: str | Path, base_model_path: str) -> Path:
    """Write diff `row` of a shard as a PEFT adapter directory that PeftModel.from_pretrained loads."""
    from peft import LoraConfig

    modules = [m for m in shard.modules if shard.A[m][row].abs().sum() > 0 or shard.B[m][row].abs().sum() > 0]
    # alpha = scale * r reproduces the scale exactly (PEFT divides by r without rslora).
    config = LoraConfig(r=shard.rank, lora_alpha=shard.scale * shard.rank, target_modules=modules,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model_path)
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m}.lora_A.weight"] = shard.B[m][row].T.contiguous()  # (r, in)
        tensors[f"base_model.model.{m}.lora_B.weight"] = shard.A[m][row].T.contiguous()  # (out, r)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / EXPORT_RECORD, {"weights_sha256": sha256_file(tmp / "adapter_model.safetensors"),
                                                "diff_id": shard.diff_ids[row], "base_model": shard.base_model,
                                                "base_sha256": shard.base_sha256})
    return out_dir
