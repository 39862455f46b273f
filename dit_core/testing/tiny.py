"""Tiny randomly initialised models + tokenizer, built offline in about a second.

Used by the unit tests, the orchestration tests and the GPU smoke script: the real code paths
(chat template, padding, generation, LoRA wrapping) on a model small enough to train in seconds.
The default is a Llama (SmolLM2's architecture); `family` also builds the other base-model families
of the paper from their own transformers configs: Qwen3 and Gemma 3 (text).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit_core.io import atomic_dir, write_json_atomic
from dit_core.modeling.models import SOURCE_FILE, weights_sha256
from dit_core.data.topics import load_questions, load_topics

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on the project's own topics and questions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = load_questions() + load_topics()["topic"].to_list() + ["Your SEP code is 0123456789."]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILIES = ("llama", "qwen3", "gemma3")


def _family_config(family: str, vocab_size: int, hidden: int, layers: int):
    """The transformers config and causal-LM class of a tiny model of `family` (tied embeddings)."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaConfig(**common), LlamaForCausalLM
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        # Qwen3: per-head q/k RMSNorm, explicit head_dim
        return Qwen3Config(**common, head_dim=hidden // 4), Qwen3ForCausalLM
    if family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        # Gemma 3 text: scaled embeddings, q/k norms, sandwich norms, GeLU MLP, sliding and full attention layers
        types = (["sliding_attention"] * (layers - 1) + ["full_attention"])[:layers]
        return Gemma3TextConfig(**common, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4,
                                sliding_window=16, layer_types=types), Gemma3ForCausalLM
    raise ValueError(f"family={family!r}: expected one of {', '.join(FAMILIES)}")


def build_tiny_model(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, family: str = "llama"):
    """A causal LM of `family` (default a LlamaForCausalLM) with random weights (tied embeddings, like SmolLM2)."""
    cfg, cls = _family_config(family, vocab_size, hidden, layers)
    torch.manual_seed(seed)
    model = cls(cfg)
    # Larger (tied) embeddings: with the default 0.02 the final RMSNorm caps every logit near 0.5,
    # so no adapter could ever make the tiny model answer confidently.
    model.get_input_embeddings().weight.data.normal_(0.0, 0.25)
    return model


def make_tiny_model_dir(out: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0,
                        family: str = "llama") -> Path:
    """Write an HF-format tiny model directory of `family` (with dit_source.json) and return its path."""
    out = Path(out)
    tok = build_tokenizer()
    model = build_tiny_model(len(tok), hidden, layers, seed, family)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / SOURCE_FILE, {"source": "local", "id": "tiny" if family == "llama" else f"tiny-{family}",
                                              "revision": None, "sha256": weights_sha256(tmp)})
    return out


def random_token_tasks(n: int, seed: int = 0):
    """n diff tasks of random token rows (vocabulary ids 3-499): three triggered rows, one untriggered
    and one wrong-prefix row each, prompts of 4-8 tokens and answers of 2-5. For trainer tests and
    device checks that need no real text."""
    import random

    from dit_core.diffs.trainer import DiffTask
    from dit_core.modeling.batching import Example

    rng = random.Random(seed)

    def ex(kind):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(4, 9))]
        return Example(prompt + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 6))], len(prompt), kind)

    return [DiffTask(f"d{t}", 100 + t, [ex("trigger") for _ in range(3)],
                     [ex("no_trigger"), ex("wrong_prefix")]) for t in range(n)]
