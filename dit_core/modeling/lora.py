"""Factored LoRA layers: a batch of per-row weight diffs plus one shared adapter.

Convention (stated once, used everywhere; also written into every diff file's metadata):
for an adapted linear layer with weight W: [out, in],

    A: [r, out]   (output-side factor)      B: [in, r]   (input-side factor)
    delta_W = (B @ A)^T * scale             y = x W^T + ((x @ B) @ A) * scale

A batch of diffs is stacked: A: [N, r, out], B: [N, in, r]; `row_index[b]` says which diff batch row b
uses. The product B @ A is never materialised: that would cost batch x in x out per layer.
Full finetunes train dense diffs instead (`DiffModel.set_dense_diffs`: W: [N, in, out] = delta_W^T,
diff_B None), reduced to factors before they are stored (dit_core.diffs.full).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

CONVENTION = "delta_W[out,in] = (B[in,r] @ A[r,out]).T * scale; y = x W^T + ((x @ B) @ A) * scale"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) by oneDNN's kernels (the op torch's inductor uses for CPU linears)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnFrozenLinear(torch.autograd.Function):
    """A frozen fp32 linear through oneDNN, forward and input gradient (the weight takes none)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return onednn_linear(grad.contiguous(), weight.t()), None, None  # grad @ W, from a transposed view


_ONEDNN_FP32 = False  # set inside `onednn_fp32_linears()`


class RoutedLinear(nn.Linear):
    """An nn.Linear that runs on oneDNN's kernels inside `onednn_fp32_linears()` when its fp32 weight takes
    no gradient, on a CPU, outside autocast and torch.compile (whose CPU backend chooses its own kernels);
    everywhere else exactly nn.Linear. `route_linears` turns a model's nn.Linear layers into these in place
    (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (_ONEDNN_FP32 and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and not w.requires_grad and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()):
            return _OneDnnFrozenLinear.apply(x, w, self.bias)
        return super().forward(x)


def route_linears(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of `model` (decoder projections, lm_head) a RoutedLinear, in place."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = RoutedLinear
    return model


@contextmanager
def onednn_fp32_linears(enabled: bool = True) -> Iterator[None]:
    """Inside: every RoutedLinear (all linears of a model from `load_model` or wrapped by DiffModel) with a
    frozen fp32 weight runs on oneDNN's kernels on a CPU, outside autocast
    (dit_core.modeling.models.fp32_linear_decision says where that is faster)."""
    global _ONEDNN_FP32
    before, _ONEDNN_FP32 = _ONEDNN_FP32, enabled
    try:
        yield
    finally:
        _ONEDNN_FP32 = before


class DiffLinear(nn.Module):
    """A frozen linear layer, plus per-row diffs (switchable) and an optional shared adapter."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        # Per-row diffs; set by DiffModel.set_diffs, never registered as this module's parameters.
        self.diff_A: torch.Tensor | None = None  # (N, r, out)
        self.diff_B: torch.Tensor | None = None  # (N, in, r)
        self.diff_scale: float | torch.Tensor = 1.0  # float, or (N,) per-diff scales
        self.row_index: torch.Tensor | None = None  # (batch,) long; None: row b uses diff b
        self.diffs_enabled = True
        # Shared adapter (the interpreter); registered parameters when attached.
        self.adapter_A: nn.Parameter | None = None  # (r, out)
        self.adapter_B: nn.Parameter | None = None  # (in, r)
        self.adapter_scale = 1.0
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (b, s, out)
        if self.diffs_enabled and self.diff_A is not None:
            y = y + self._diff_delta(x)
        if self.adapter_enabled and self.adapter_A is not None:
            h = x @ self.adapter_B.to(x.dtype)  # (b, s, r)
            y = y + (h @ self.adapter_A.to(x.dtype)) * self.adapter_scale
        return y

    def _diff_delta(self, x: torch.Tensor) -> torch.Tensor:
        A, B, scale = self.diff_A, self.diff_B, self.diff_scale
        if B is None:
            return self._dense_delta(x)
        # Scale folded into the small factor A (N, r, out), not applied to the (b, s, out) output;
        # skipped at scale 1 (training's default), which saves a kernel and its backward per module.
        if isinstance(scale, torch.Tensor):
            A = A * scale.to(A.dtype)[:, None, None]
        elif scale != 1:
            A = A * scale
        group = self.__dict__.get("rows_per_diff")
        if group:
            # Rows come in equal, contiguous groups per diff (training batches): one bmm per diff,
            # no per-row gather of the factors.
            b, s, _ = x.shape
            xg = x.reshape(A.shape[0], group * s, -1)  # (N, n*s, in)
            delta = torch.bmm(torch.bmm(xg, B.to(x.dtype)), A.to(x.dtype))  # (N, n*s, out)
            return delta.reshape(b, s, -1)
        if self.row_index is not None:  # index_select: a backward independent of the thread count
            A, B = A.index_select(0, self.row_index), B.index_select(0, self.row_index)  # (b, r, out), (b, in, r)
        if A.shape[0] != x.shape[0]:
            raise ValueError(
                f"{x.shape[0]} batch rows but {A.shape[0]} diffs: pass row_index to set_diffs"
            )
        # bmm, not einsum: at rank 1 einsum turns both products into broadcast multiplies and sums that
        # materialise (b, s, in) products (measured by bench/bench_lora_delta.py; docs/benchmarks.md).
        return torch.bmm(torch.bmm(x, B.to(x.dtype)), A.to(x.dtype))  # (b, s, out)

    def _dense_delta(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W[d] for dense diffs W = diff_A: (N, in, out) = delta_W^T (full finetunes in training).

        Rows are grouped per diff (one matmul each), never gathered: a gathered (b, in, out) copy per
        layer would be kept for the backward, b times the model's size.
        """
        W = self.diff_A.to(x.dtype)
        group = self.__dict__.get("rows_per_diff")
        if group:
            b, s, _ = x.shape
            return torch.bmm(x.reshape(W.shape[0], group * s, -1), W).reshape(b, s, -1)
        if self.row_index is None:
            if W.shape[0] != x.shape[0]:
                raise ValueError(f"{x.shape[0]} batch rows but {W.shape[0]} diffs: pass row_index to set_diffs")
            return torch.bmm(x, W)
        out = None
        for d, rows in self.__dict__["dense_groups"]:
            y = x[rows] @ W[d]  # under autocast in its compute dtype, which the sum takes too
            out = (y.new_zeros(*x.shape[:-1], W.shape[2]) if out is None else out).index_add(0, rows, y)
        return x.new_zeros(*x.shape[:-1], W.shape[2]) if out is None else out


def linear_module_names(model: nn.Module, pattern: str = r".*") -> list[str]:
    """Names of the decoder's linear layers (lm_head excluded) whose name matches `pattern`."""
    rx = re.compile(pattern)
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, DiffLinear):
            mod = mod.base_layer
        elif ".base_layer" in name:
            continue
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}" and rx.search(name):
            names.append(name)
    return names


def unwrappable_reason(model: nn.Module, pattern: str) -> str:
    """Why no layer of `model` can hold diffs for `diffs.modules=pattern`: what was expected, what was found."""
    decoder = linear_module_names(model)
    if decoder:
        return (f"diffs.modules={pattern!r} matches none of the {len(decoder)} linear layers of "
                f"{type(model).__name__}'s decoder (e.g. {', '.join(decoder[:3])}); set diffs.modules to a regex "
                "over those names")
    found: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if name and not list(mod.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and not isinstance(mod, nn.Embedding):
            where = "" if ".layers." in f".{name}" or not isinstance(mod, nn.Linear) else " outside .layers."
            found.setdefault(type(mod).__name__ + where, []).append(name)
    seen = "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in found.items()) or "no 2-D weight layers"
    return (f"{type(model).__name__} has no layer diffs can be trained on: expected torch.nn.Linear projections "
            "inside decoder layers named <...>.layers.<i>.<...> (as in Llama, Qwen3, Gemma 3), found " + seen)


def _equal_groups(row_index: torch.Tensor | list[int] | None, A: torch.Tensor | None) -> int | None:
    """n when row_index is [0]*n + [1]*n + ... + [N-1]*n for all N installed diffs, else None.

    Pass a host list where there is one: comparing a device tensor waits for the device.
    """
    if row_index is None or A is None:
        return None
    size = len(row_index) if isinstance(row_index, list) else row_index.numel()
    if size % A.shape[0]:
        return None
    n = size // A.shape[0]
    if isinstance(row_index, list):
        return n if row_index == [d for d in range(A.shape[0]) for _ in range(n)] else None
    expected = torch.arange(A.shape[0], device=row_index.device).repeat_interleave(n)
    return n if torch.equal(row_index, expected) else None


class DiffModel:
    """Wraps a causal LM once: every selected linear layer becomes a DiffLinear.

    Reuse it across batches: `set_diffs` swaps tensors in, it never re-wraps the model.
    """

    def __init__(self, model: nn.Module, pattern: str = r".*"):
        self.model = route_linears(model)
        self.names = linear_module_names(model, pattern)
        if not self.names:
            raise ValueError(unwrappable_reason(model, pattern))
        self.layers: dict[str, DiffLinear] = {}
        for name in self.names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            current = getattr(parent, child)
            if not isinstance(current, DiffLinear):
                current = DiffLinear(current)
                setattr(parent, child, current)
            self.layers[name] = current
        for p in model.parameters():
            p.requires_grad_(False)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each adapted module."""
        return {n: (m.in_features, m.out_features) for n, m in self.layers.items()}

    def set_diffs(
        self,
        A: dict[str, torch.Tensor],
        B: dict[str, torch.Tensor],
        scale: float | torch.Tensor = 1.0,
        row_index: torch.Tensor | None = None,
    ) -> None:
        """Install stacked diffs A[name]: (N, r, out), B[name]: (N, in, r); rows pick by row_index."""
        missing = set(self.layers) - set(A)
        if missing:
            raise KeyError(f"diff lacks {len(missing)} adapted modules, e.g. {sorted(missing)[0]}")
        for name, layer in self.layers.items():
            # Plain attributes, not registered parameters, even when the caller trains them.
            layer.__dict__.update(diff_A=A[name], diff_B=B[name], diff_scale=scale)
        self.set_row_index(row_index)

    def set_dense_diffs(self, W: dict[str, torch.Tensor], row_index: torch.Tensor | None = None) -> None:
        """Install stacked dense diffs W[name]: (N, in, out) = delta_W^T (scale 1); rows pick by row_index.

        Full finetunes train these; stored diffs are always factors (dit_core.diffs.full reduces them).
        """
        missing = set(self.layers) - set(W)
        if missing:
            raise KeyError(f"dense diff lacks {len(missing)} adapted modules, e.g. {sorted(missing)[0]}")
        for name, layer in self.layers.items():
            n, fan_in, fan_out = W[name].shape
            if (fan_in, fan_out) != (layer.in_features, layer.out_features):
                raise ValueError(f"dense diff for {name} is {tuple(W[name].shape)}, expected "
                                 f"(N, {layer.in_features}, {layer.out_features})")
            layer.__dict__.update(diff_A=W[name], diff_B=None, diff_scale=1.0)
        self.set_row_index(row_index)

    def set_row_index(self, row_index: torch.Tensor | None, host_index: list[int] | None = None) -> None:
        """Change which diff each batch row uses, keeping the installed diffs.

        `host_index`, the same indices as a list, spares a device round trip on the training path.
        """
        first = next(iter(self.layers.values()))
        diff_A = first.diff_A
        group = _equal_groups(host_index if host_index is not None else row_index, diff_A)
        groups = None
        if diff_A is not None and first.diff_B is None and row_index is not None and not group:
            # Dense diffs: the batch rows of each diff, as index tensors on the rows' device.
            host = host_index if host_index is not None else row_index.tolist()
            by_diff: dict[int, list[int]] = {}
            for b, d in enumerate(host):
                by_diff.setdefault(int(d), []).append(b)
            groups = [(d, torch.tensor(rows, device=row_index.device)) for d, rows in by_diff.items()]
        for layer in self.layers.values():
            layer.row_index = row_index
            layer.__dict__["rows_per_diff"] = group
            layer.__dict__["dense_groups"] = groups

    def clear_diffs(self) -> None:
        """Remove installed diffs (the model behaves as the base model again)."""
        for layer in self.layers.values():
            layer.diff_A = layer.diff_B = layer.row_index = None
            layer.__dict__["rows_per_diff"] = layer.__dict__["dense_groups"] = None

    @contextmanager
    def diffs_disabled(self) -> Iterator[None]:
        """Run the base model (e.g. the KL teacher) without copying it: diffs switched off."""
        for layer in self.layers.values():
            layer.diffs_enabled = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.diffs_enabled = True

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run without the shared adapter (e.g. baselines that ask the finetuned model itself)."""
        for layer in self.layers.values():
            layer.adapter_enabled = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.adapter_enabled = True

    def attach_adapter(self, rank: int, alpha: float, init_std: float = 0.02) -> list[nn.Parameter]:
        """Add a trainable shared LoRA (output-side factor zero at init); returns its parameters."""
        params = []
        for layer in self.layers.values():
            p = next(layer.base_layer.parameters())
            layer.adapter_B = nn.Parameter(
                torch.randn(layer.in_features, rank, device=p.device) * init_std
            )
            layer.adapter_A = nn.Parameter(torch.zeros(rank, layer.out_features, device=p.device))
            layer.adapter_scale = alpha / rank
            params += [layer.adapter_A, layer.adapter_B]
        return params

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The shared adapter's tensors as `<module>.A` / `<module>.B`."""
        out = {}
        for name, layer in self.layers.items():
            if layer.adapter_A is not None:
                out[f"{name}.A"] = layer.adapter_A.detach()
                out[f"{name}.B"] = layer.adapter_B.detach()
        return out

    def load_adapter_state(self, state: dict[str, torch.Tensor], alpha: float) -> None:
        """Install a saved shared adapter (frozen unless the caller enables grads)."""
        for name, layer in self.layers.items():
            A, B = state[f"{name}.A"], state[f"{name}.B"]
            p = next(layer.base_layer.parameters())
            layer.adapter_A = nn.Parameter(A.to(p.device, torch.float32), requires_grad=False)
            layer.adapter_B = nn.Parameter(B.to(p.device, torch.float32), requires_grad=False)
            layer.adapter_scale = alpha / A.shape[0]
