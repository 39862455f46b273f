"""Model sources: local directories load (with their recorded hash), bad inputs fail with the fix."""

import json
import shutil

import pytest
import torch

from dit_core.modeling.models import ModelSourceError, fetch_model, load_model, model_dir, resolve_device_dtype
from conftest import section


def test_local_source_is_copied_once_and_hash_recorded(tiny_model_dir, tmp_path):
    cfg = section("model", source="local", id=str(tiny_model_dir))
    path, fetched = fetch_model(cfg, tmp_path)
    assert fetched and path == model_dir(cfg, tmp_path)
    again, fetched_again = fetch_model(cfg, tmp_path)
    assert again == path and fetched_again is False
    lm = load_model(path, "cpu", "float32")
    assert lm.sha256 == json.loads((path / "dit_source.json").read_text())["sha256"]
    other = section("model", source="gguf", id=str(tmp_path / "tiny-llama.gguf"))
    with pytest.raises(ModelSourceError, match="holds a different model"):
        fetch_model(other, tmp_path)


def test_missing_and_corrupt_models(tiny_model_dir, tmp_path):
    with pytest.raises(ModelSourceError, match="run `dit stage download`"):
        load_model(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ModelSourceError, match="may be corrupt: delete .*broken"):
        load_model(broken, "cpu", "float32")
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        fetch_model(section("model", source="gguf", id=str(tmp_path / "x.gguf")), tmp_path / "models")
    with pytest.raises(ModelSourceError, match="not an HF-format model directory"):
        fetch_model(section("model", source="local", id=str(tmp_path)), tmp_path / "models")
    assert not (tmp_path / "models" / "x").exists()  # a failed fetch leaves nothing half-written


def test_hub_source_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="could not download 'HuggingFaceTB/none-such'"):
        fetch_model(section("model", source="hub", id="HuggingFaceTB/none-such"), tmp_path)


def test_device_dtype_defaults():
    dev, dt = resolve_device_dtype("cpu", "auto")
    assert str(dev) == "cpu" and str(dt) == "torch.float32"


def test_hub_source_loads_from_a_local_hub_cache(tiny_model_dir, tmp_path, monkeypatch):
    """The real hub code path (huggingface_hub.snapshot_download), served from a local cache offline."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snap)
    (snap / "dit_source.json").unlink()
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    path, fetched = fetch_model(section("model", source="hub", id="acme/tiny"), tmp_path / "models")
    assert fetched and (path / "config.json").exists()
    assert load_model(path, "cpu", "float32").model.config.hidden_size == 32



def _fake_cpu(monkeypatch, tmp_path, flags: str) -> None:
    """Make the project read a /proc/cpuinfo with these flags."""
    from dit_core.modeling import models

    f = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    f.write_text(f"processor\t: 0\nmodel name\t: test cpu\nflags\t\t: fpu sse2 avx2 avx512f {flags}\n")
    read = models.cpu_flags
    monkeypatch.setattr(models, "cpu_flags", lambda cpuinfo=f: read(cpuinfo))


def test_autocast_auto_follows_native_bf16_not_onednn(tmp_path, monkeypatch):
    """avx512f alone (bf16 emulated, ~3x slower) stays fp32 even though oneDNN reports bf16 support."""
    from dit_core.modeling import models

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    _fake_cpu(monkeypatch, tmp_path, "avx512bw avx512_vnni")
    use, why = models.autocast_decision("cpu", "auto")
    assert not use and "no native bf16" in why
    with models.compute_context("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")

    _fake_cpu(monkeypatch, tmp_path, "avx512_bf16 amx_bf16")
    use, why = models.autocast_decision("cpu", "auto")
    assert use and "avx512_bf16" in why and "amx_bf16" in why
    with models.compute_context("cpu", "auto"):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_autocast_auto_honours_a_onednn_isa_cap_below_bf16(tmp_path, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps oneDNN off the CPU's bf16 instructions: bf16 would be emulated."""
    from dit_core.modeling import models

    _fake_cpu(monkeypatch, tmp_path, "avx512_bf16")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    use, why = models.autocast_decision("cpu", "auto")
    assert not use and "ONEDNN_MAX_CPU_ISA=AVX512_CORE" in why and "emulated" in why
    assert models.autocast_decision("cpu", "bf16")[0] is True  # an explicit setting still wins
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert models.autocast_decision("cpu", "auto")[0] is True
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert models.autocast_decision("cpu", "auto")[0] is False
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    assert models.autocast_decision("cpu", "auto")[0] is True


def test_autocast_settings_off_and_bf16_are_obeyed_and_cuda_auto_is_off():
    from dit_core.modeling.models import autocast_decision

    assert autocast_decision("cpu", "off")[0] is False
    assert autocast_decision("cpu", "bf16")[0] is True
    assert autocast_decision("cuda", "auto") == (False, "off on cuda: weights are already in model.dtype")


def test_without_cpuinfo_only_an_amx_capability_counts(tmp_path, monkeypatch):
    from dit_core.modeling import models

    read = models.cpu_flags
    monkeypatch.setattr(models, "cpu_flags", lambda: read(tmp_path / "absent"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert models.native_bf16_flags() == []
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AMX")
    assert models.native_bf16_flags() == ["AMX"]
