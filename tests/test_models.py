"""Model sources: local directories load (with their recorded hash), bad inputs fail with the fix."""

import json
import shutil

import pytest

from dit_core.config import ModelConfig
from dit_core.modeling.models import ModelSourceError, fetch_model, load_model, model_dir, resolve_device_dtype


def test_local_source_is_copied_once_and_hash_recorded(tiny_model_dir, tmp_path):
    cfg = ModelConfig(source="local", id=str(tiny_model_dir))
    path, fetched = fetch_model(cfg, tmp_path)
    assert fetched and path == model_dir(cfg, tmp_path)
    again, fetched_again = fetch_model(cfg, tmp_path)
    assert again == path and fetched_again is False
    lm = load_model(path, "cpu", "float32")
    assert lm.sha256 == json.loads((path / "dit_source.json").read_text())["sha256"]
    other = ModelConfig(source="gguf", id=str(tmp_path / "tiny-llama.gguf"))
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
        fetch_model(ModelConfig(source="gguf", id=str(tmp_path / "x.gguf")), tmp_path / "models")
    with pytest.raises(ModelSourceError, match="not an HF-format model directory"):
        fetch_model(ModelConfig(source="local", id=str(tmp_path)), tmp_path / "models")
    assert not (tmp_path / "models" / "x").exists()  # a failed fetch leaves nothing half-written


def test_hub_source_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="could not download 'HuggingFaceTB/none-such'"):
        fetch_model(ModelConfig(source="hub", id="HuggingFaceTB/none-such"), tmp_path)


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
    path, fetched = fetch_model(ModelConfig(source="hub", id="acme/tiny"), tmp_path / "models")
    assert fetched and (path / "config.json").exists()
    assert load_model(path, "cpu", "float32").model.config.hidden_size == 32
