"""Projection interpreter: the diff itself, projected to k soft tokens that the frozen base model reads.

    prompt = [prefix tokens] [k soft tokens = f(diff)] [suffix tokens: the question] -> label

f must not depend on how a diff happens to be factored (B @ A = (B c)(A / c)), so it reads the diff
through what it *does*: per module m, fixed random probe inputs P_m: [p, in] go through the diff
(P_m @ B_m @ A_m: [p, out], a linear function of delta_W), a learned W_m: [out, q] compresses each
output, and a linear (or MLP) map turns all modules' [p, q] features into k embeddings. The product
B @ A is never formed: (P_m @ B_m) is [p, r] and (A_m @ W_m) is [r, q].
"""

from __future__ import annotations

import torch
from torch import nn

from dit_core.modeling.chat import chat_prompt, encode_prompt
from dit_core.modeling.batching import Example
from dit_core.modeling.lora import DiffModel

MARK = "<<DIFF>>"
PROMPT = f"Here is a weight diff: {MARK}\n{{question}}"


class ProjectionNet(nn.Module):
    """Diff factors -> k soft-token embeddings."""

    def __init__(self, shapes: dict[str, tuple[int, int]], k: int, hidden_size: int, mlp: int = 0,
                 probes: int = 4, q: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = list(shapes)
        self.k, self.h = k, hidden_size
        for i, (name, (fan_in, fan_out)) in enumerate(shapes.items()):
            self.register_buffer(f"probe{i}", torch.randn(probes, fan_in, generator=g) / fan_in ** 0.5)
            self.register_parameter(f"w{i}", nn.Parameter(torch.randn(fan_out, q, generator=g) / fan_out ** 0.5))
        n_feat = len(shapes) * probes * q
        self.norm = nn.LayerNorm(n_feat)
        head = [nn.Linear(n_feat, mlp), nn.GELU(), nn.Linear(mlp, k * hidden_size)] if mlp else [
            nn.Linear(n_feat, k * hidden_size)]
        self.head = nn.Sequential(*head)
        self.register_buffer("embed_norm", torch.tensor(1.0))

    def forward(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, name in enumerate(self.names):
            pb = torch.einsum("pi,nir->npr", getattr(self, f"probe{i}"), B[name].float())  # (n, p, r)
            aw = A[name].float() @ getattr(self, f"w{i}")  # (n, r, q)
            feats.append((pb @ aw).flatten(1))  # (n, p*q)
        x = torch.cat(feats, 1) * scale.float()[:, None]  # (n, M*p*q)
        soft = self.head(self.norm(x)).view(-1, self.k, self.h)  # (n, k, h)
        # Fixed length, the typical norm of a real token embedding: the head learns directions only.
        return nn.functional.normalize(soft, dim=-1) * self.embed_norm


class ProjectionInterpreter:
    """Frozen base model reading a diff through soft tokens; same interface as LoraInterpreter."""

    def __init__(self, dm: DiffModel, spec, tokenizer, init_std: float = 0.02):
        self.dm, self.spec, self.tokenizer = dm, spec, tokenizer
        model = dm.model
        self.embed = model.get_input_embeddings()
        dev = self.embed.weight.device
        self.net = ProjectionNet(dm.shapes(), spec.n_soft_tokens, self.embed.embedding_dim,
                                 spec.projection_hidden).to(dev)
        self.net.embed_norm.fill_(self.embed.weight.norm(dim=-1).mean().item())
        self._prompt_cache: dict = {}
        # Optionally a small shared LoRA on the base model as well ("frozen, or with a small LoRA").
        self.lora = dm.attach_adapter(spec.rank, spec.alpha, init_std) if spec.projection_lora else []

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad] + self.lora

    def _prompt_ids(self, tokenizer, question: str) -> tuple[list[int], list[int]]:
        if question not in self._prompt_cache:
            text = chat_prompt(tokenizer, PROMPT.format(question=question))
            pre, post = text.split(MARK)
            self._prompt_cache[question] = (encode_prompt(tokenizer, pre), encode_prompt(tokenizer, post))
        return self._prompt_cache[question]

    def _soft(self, diffs, rows: list[int], n: int) -> torch.Tensor:
        dev = self.embed.weight.device
        if diffs is None:
            any_shape = self.dm.shapes()
            A = {m: torch.zeros(1, 1, o, device=dev) for m, (i, o) in any_shape.items()}
            B = {m: torch.zeros(1, i, 1, device=dev) for m, (i, o) in any_shape.items()}
            return self.net(A, B, torch.ones(1, device=dev)).expand(n, -1, -1)
        A, B, scale = diffs
        idx = torch.tensor(rows, device=dev)
        return self.net({m: v[idx] for m, v in A.items()}, {m: v[idx] for m, v in B.items()}, scale[idx])

    def _embeds(self, tokenizer, soft: torch.Tensor, answers: list[list[int]]):
        pre, post = self._prompt_ids(tokenizer, self.spec.question)
        dev = soft.device
        n, width = len(answers), len(pre) + soft.shape[1] + len(post) + max(len(a) for a in answers)
        embeds = torch.zeros(n, width, soft.shape[2], device=dev, dtype=self.embed.weight.dtype)
        mask = torch.zeros(n, width, dtype=torch.long, device=dev)
        targets = torch.full((n, width), -100, dtype=torch.long, device=dev)
        for i, ans in enumerate(answers):
            ids_pre = torch.tensor(pre, device=dev)
            ids_post = torch.tensor(post + ans, device=dev)
            k = soft.shape[1]
            row = torch.cat([self.embed(ids_pre), soft[i].to(embeds.dtype), self.embed(ids_post)])
            embeds[i, : len(row)] = row
            mask[i, : len(row)] = 1
            start = len(pre) + k + len(post)
            targets[i, start - 1 : start - 1 + len(ans)] = torch.tensor(ans, device=dev)
        return embeds, mask, targets

    def _row_logprobs(self, tokenizer, soft, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        answers = [ex.ids[ex.answer_start :] for ex in examples]
        embeds, mask, targets = self._embeds(tokenizer, soft, answers)
        hidden = self.dm.model.base_model(inputs_embeds=embeds, attention_mask=mask)[0]
        sel = targets != -100
        logits = self.dm.model.get_output_embeddings()(hidden[sel]).float()
        tok_lp = torch.log_softmax(logits, -1).gather(1, targets[sel][:, None])[:, 0]
        row = sel.nonzero()[:, 0]
        total = torch.zeros(len(answers), device=soft.device).index_add(0, row, tok_lp)
        count = torch.zeros(len(answers), device=soft.device).index_add(0, row, torch.ones_like(tok_lp))
        return total, count

    def loss_with_grad(self, A, B, scale, examples: list[Example], pad_id: int) -> torch.Tensor:
        soft = self._soft((A, B, scale), list(range(len(examples))), len(examples))
        total, count = self._row_logprobs(self.tokenizer, soft, examples)
        return (-(total / count)).mean()

    @torch.no_grad()
    def row_losses(self, A, B, scale, examples: list[Example], pad_id: int) -> torch.Tensor:
        diffs = None if A is None else (A, B, scale)
        soft = self._soft(diffs, list(range(len(examples))), len(examples))
        total, count = self._row_logprobs(self.tokenizer, soft, examples)
        return -(total / count)

    @torch.no_grad()
    def label_logprobs(self, diffs, rows: list[int], examples: list[Example], pad_id: int) -> torch.Tensor:
        out = []
        for i in range(0, len(rows), 64):
            soft = self._soft(diffs, rows[i : i + 64], len(rows[i : i + 64]))
            out.append(self._row_logprobs(self.tokenizer, soft, examples[i : i + 64])[0])
        return torch.cat(out).cpu()

    @torch.no_grad()
    def describe(self, tokenizer, diffs, rows: list[int], max_new_tokens: int = 16, question=None) -> list[str]:
        """Greedy answers, one per output row (row i reads diff rows[i], or no diff)."""
        texts = []
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            soft = self._soft(diffs, chunk, len(chunk))
            embeds, mask, _ = self._embeds(tokenizer, soft, [[] for _ in chunk])
            ids = self.dm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id)
            for row in ids.tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"projection.{k}": v.detach() for k, v in self.net.state_dict().items()}
        return out | (self.dm.adapter_state() if self.lora else {})

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k.removeprefix("projection."): v for k, v in state.items()
                                  if k.startswith("projection.")})
        for name, layer in self.dm.layers.items():
            if self.lora:
                layer.adapter_A.data.copy_(state[f"{name}.A"])
                layer.adapter_B.data.copy_(state[f"{name}.B"])
