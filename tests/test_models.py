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


def test_fp32_linear_decision_follows_the_cpu_vendor(monkeypatch):
    """auto takes oneDNN's fp32 linears on AMD CPUs only (decided without timing anything); explicit settings,
    autocast and CUDA are obeyed; an unusable op is an error only when asked for by name."""
    from dit_core.modeling import lora, models

    vendor = {"id": "AuthenticAMD"}
    monkeypatch.setattr(models, "cpu_vendor", lambda: vendor["id"])
    monkeypatch.setattr(models, "onednn_fp32_usable", lambda: (True, "usable"))
    assert models.fp32_linear_decision("cpu", "auto", "off")[0] is True
    assert models.fp32_linear_decision("cpu", "torch", "off")[0] is False
    assert models.fp32_linear_decision("cpu", "auto", "bf16")[0] is False  # bf16 autocast: no fp32 linears
    assert models.fp32_linear_decision("cuda", "onednn", "off")[0] is False
    with models.compute_context("cpu", "off", "auto"):
        assert lora._ONEDNN_FP32
    assert not lora._ONEDNN_FP32
    with models.compute_context("cpu", "off", "torch"):
        assert not lora._ONEDNN_FP32

    vendor["id"] = "GenuineIntel"
    use, why = models.fp32_linear_decision("cpu", "auto", "off")
    assert not use and "GenuineIntel" in why
    assert models.fp32_linear_decision("cpu", "onednn", "off")[0] is True
    vendor["id"] = None
    assert models.fp32_linear_decision("cpu", "auto", "off")[0] is False

    vendor["id"] = "AuthenticAMD"
    monkeypatch.setattr(models, "onednn_fp32_usable", lambda: (False, "no op"))
    assert models.fp32_linear_decision("cpu", "auto", "off") == (False, "torch: no op")
    with pytest.raises(ModelSourceError, match="model.fp32_linear=onednn, but no op"):
        models.fp32_linear_decision("cpu", "onednn", "off")


def test_cpu_vendor_is_read_from_cpuinfo(tmp_path):
    from dit_core.modeling.models import cpu_vendor, onednn_fp32_usable

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512f\n")
    assert cpu_vendor(info) == "AuthenticAMD"
    assert cpu_vendor(tmp_path / "absent") is None
    assert onednn_fp32_usable()[0] is True  # torch's x86 CPU wheels ship oneDNN


def test_onednn_fp32_linears_give_torch_outputs_and_gradients(tiny_model_dir):
    """The same forward and input gradients through oneDNN's kernels as through torch's, with every frozen
    linear of the loaded model (decoder and lm_head) taking the oneDNN path (counted); none under autocast.
    Routing changes no parameter or state-dict key."""
    from transformers import AutoModelForCausalLM

    from dit_core.modeling import lora
    from dit_core.modeling.lora import DiffModel, RoutedLinear

    model = load_model(tiny_model_dir, "cpu", "float32").model
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model.lm_head) is RoutedLinear and type(plain.lm_head) is torch.nn.Linear
    assert list(model.state_dict()) == list(plain.state_dict())
    dm = DiffModel(model)
    g = torch.Generator().manual_seed(0)
    shapes = dm.shapes()
    A = {k: (torch.randn(2, 1, o, generator=g) * 0.1).requires_grad_() for k, (i, o) in shapes.items()}
    B = {k: (torch.randn(2, i, 1, generator=g) * 0.1).requires_grad_() for k, (i, o) in shapes.items()}
    dm.set_diffs(A, B, row_index=torch.tensor([0, 1, 1]))
    ids = torch.randint(3, 400, (3, 9), generator=g)
    calls = []
    real = lora._OneDnnFrozenLinear.forward
    monkey = staticmethod(lambda ctx, x, w, b: calls.append(1) or real(ctx, x, w, b))

    def run():
        out = dm.model(input_ids=ids).logits
        out.square().mean().backward()
        grads = [A[k].grad.clone() for k in A] + [B[k].grad.clone() for k in B]
        for t in list(A.values()) + list(B.values()):
            t.grad = None
        return out.detach(), grads

    ref, gref = run()
    lora._OneDnnFrozenLinear.forward = monkey
    try:
        with lora.onednn_fp32_linears():
            got, ggot = run()
            n = len(calls)
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                dm.model(input_ids=ids)
    finally:
        lora._OneDnnFrozenLinear.forward = real
    assert n == len(shapes) + 1 == len(calls)  # every wrapped layer and the lm_head once; none under autocast
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(ggot, gref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
