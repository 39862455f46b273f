"""Model shapes for benchmarks: a model built from its published config, with random weights.

A benchmark of a large model needs its shapes, not its weights: `build_model("qwen3-4b", ...)` makes a
Qwen3-4B-shaped model on the device (nothing is downloaded), `layer_shapes(name)` lists the (in, out)
of every layer a diff adapts, read off the model built on the meta device (no memory).
"""

from __future__ import annotations

import torch

# Published configs (the models' config.json), the keys that set the shapes.
CONFIGS = {
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                               max_position_embeddings=40960)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                                   tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   max_position_embeddings=8192)),
    # Test-sized stand-ins of the same families (seconds on a CPU).
    "tiny-qwen3": ("qwen3", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                                 max_position_embeddings=512)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                           max_position_embeddings=512)),
}


def build_config(name: str, vocab_size: int | None = None):
    """The transformers config of `name` (vocab_size: at least this many token ids, e.g. a tokenizer's)."""
    from transformers import AutoConfig

    if name not in CONFIGS:
        raise SystemExit(f"unknown model shape {name!r}; known: {', '.join(sorted(CONFIGS))}")
    model_type, values = CONFIGS[name]
    values = dict(values)
    if vocab_size is not None:
        values["vocab_size"] = max(values["vocab_size"], vocab_size)
    cfg = AutoConfig.for_model(model_type, **values)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(name: str, device, dtype: torch.dtype, vocab_size: int | None = None, seed: int = 0):
    """A `name`-shaped causal LM with random weights, built directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    cfg = build_config(name, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def layer_shapes(name: str, pattern: str = r".*") -> dict[str, tuple[int, int]]:
    """(in, out) of each layer a diff adapts in a `name`-shaped model (diffs.modules = `pattern`)."""
    from dit_core.modeling.lora import DiffModel

    return DiffModel(build_model(name, "meta", torch.float32), pattern).shapes()
