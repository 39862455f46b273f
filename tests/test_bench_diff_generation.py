"""bench/bench_diff_generation.py on the tiny model: the params.yaml recipe and the profile table."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_diff_generation as bench  # noqa: E402


def test_bench_with_params_recipe_and_profile(tmp_path):
    out = tmp_path / "gen.json"
    bench.main(["--tiny", "--T", "1", "2", "--steps", "2", "--params", str(ROOT / "params.yaml"),
                "--torch-profile", "--autocast", "bf16", "--out", str(out)])
    # the mixed-precision region is closed again: later code in this process runs in fp32
    assert not torch.is_autocast_enabled("cpu")
    res = json.loads(out.read_text())
    assert res["params"].endswith("params.yaml")
    assert [r["T"] for r in res["results"]] == [1, 2]
    assert all(r["tokens_per_second"] > 0 and r["seconds"] > 0 for r in res["results"])
    assert res["results"][0]["speedup_per_diff_vs_first"] == 1.0
    for T in (1, 2):
        table = (tmp_path / f"gen_profile_T{T}.txt").read_text()
        assert "Self CPU" in table and "aten::" in table


def test_bench_host_prep_only(tmp_path):
    """--host-prep times the host's per-step work with the tokenizer alone, in the --set recipe."""
    from dit_core.testing.tiny import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "prep.json"
    bench.main(["--host-prep", "--model", str(model), "--T", "2", "4", "--params", str(ROOT / "params.yaml"),
                "--set", "diffs.trigger_rows=2", "--set", "diffs.wrong_prefix_rows=2", "--out", str(out)])
    res = json.loads(out.read_text())["host_prep"]
    # per diff: 2 triggered rows + the shared KL rows (2 wrong-prefix + params.yaml's 1 untriggered)
    assert [(r["T"], r["rows_per_step"]) for r in res] == [(2, 10), (4, 20)]
    assert all(r["sample_ms"] > 0 and r["pack_ms"] > 0 for r in res)


def test_bench_with_compiled_decoder_layers(tmp_path):
    """--compile compiles every decoder layer in place (the diffs still switch per batch) and trains."""
    from dit_core.modeling.models import load_model
    from dit_core.testing.tiny import make_tiny_model_dir

    model = load_model(make_tiny_model_dir(tmp_path / "m"), "cpu", "float32").model
    assert bench.compile_decoder_layers(model) == model.config.num_hidden_layers
    out = tmp_path / "gen.json"
    bench.main(["--tiny", "--T", "2", "--steps", "1", "--compile", "--autocast", "off", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["compiled"] is True and res["results"][0]["seconds"] > 0
