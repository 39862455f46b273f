"""PEFT interop: a PEFT LoRA adapter directory <-> a weight diff in this project's convention.

PEFT stores lora_A: [r, in], lora_B: [out, r] with delta_W = lora_B @ lora_A * (alpha / r)
(alpha / sqrt(r) with rslora). Here B: [in, r], A: [r, out], delta_W = (B @ A)^T * scale, so
B = lora_A^T, A = lora_B^T and scale carries over. Modules the adapter does not touch get zero factors.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_core.diffs.store import DiffFileError, DiffShard
from dit_core.io import atomic_dir

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _recorded_base(cfg: dict) -> str | None:
    """The base model an adapter records (`base_model_name_or_path`), as a bare lower-case name."""
    name = cfg.get("base_model_name_or_path")
    return Path(str(name).rstrip("/")).name.lower() if name else None


def import_peft(adapter_dir: str | Path, shapes: dict[str, tuple[int, int]], base_model: str,
                base_sha256: str, any_base: bool = False) -> DiffShard:
    """Read a PEFT LoRA adapter (safetensors) as a one-diff shard covering every wrapped module.

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
    try:
        cfg = json.loads(cfg_path.read_text())
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DiffFileError(f"{cfg_path}: not a readable PEFT adapter config ({type(e).__name__}: {e}); "
                            "expected JSON with peft_type, r and lora_alpha") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise DiffFileError(f"{adapter_dir}: peft_type={cfg.get('peft_type')}; only LoRA adapters are diffs")
    recorded = _recorded_base(cfg)
    if recorded and recorded != base_model.lower() and not any_base:
        raise DiffFileError(f"{cfg_path}: the adapter was trained on base model {cfg['base_model_name_or_path']!r}, "
                            f"not the loaded {base_model!r}; load that base model, or pass --any-base if it is the "
                            "same model under another name")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    found: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m:
                    found.setdefault(m["module"], {})[m["which"]] = f.get_tensor(key).float()
    except Exception as e:  # a pickle or a truncated file under the safetensors name
        raise DiffFileError(f"{weights}: not a readable safetensors file ({e}); save the adapter with "
                            "safe_serialization=True") from e
    if not found:
        raise DiffFileError(f"{weights}: no lora_A/lora_B tensors found")
    unknown = sorted(set(found) - set(shapes))
    if unknown:
        raise DiffFileError(f"{adapter_dir}: adapter targets modules the base model lacks: {unknown[:3]}")
    A, B = {}, {}
    for name, (fan_in, fan_out) in shapes.items():
        pair = found.get(name)
        if pair is None:
            A[name], B[name] = torch.zeros(1, r, fan_out), torch.zeros(1, fan_in, r)
            continue
        la, lb = pair.get("A"), pair.get("B")
        if la is None or lb is None:
            raise DiffFileError(f"{adapter_dir}: {name} lacks lora_{'A' if la is None else 'B'}")
        if tuple(la.shape) != (r, fan_in) or tuple(lb.shape) != (fan_out, r):
            raise DiffFileError(f"{adapter_dir}: {name} has lora_A{tuple(la.shape)} lora_B{tuple(lb.shape)}, "
                                f"expected lora_A{(r, fan_in)} lora_B{(fan_out, r)}")
        if not (torch.isfinite(la).all() and torch.isfinite(lb).all()):
            raise DiffFileError(f"{adapter_dir}: {name} contains NaN or Inf")
        B[name], A[name] = la.T.unsqueeze(0).contiguous(), lb.T.unsqueeze(0).contiguous()
    return DiffShard(A, B, base_model, base_sha256, r, scale, [adapter_dir.name])


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
    return out_dir
