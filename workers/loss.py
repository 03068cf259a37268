"""Causal-LM cross-entropy by chunks of tokens: full-vocabulary logits never exist for all tokens at once.

    loss = (1 / N) · Σ_{t: y_t ≠ -100} [ logsumexp(z_t) − z_t[y_t] ],    z_t = W h_t + b

h: (T, d) final hidden states, y: (T,) the labels shifted by one (h_t predicts token t + 1, as the
models' own loss shifts), W: (V, d) the LM head, b: (V,) or None, N the number of labelled tokens.
The plain path (the model's `.loss`) builds z for every token, (B, L, V), then a float32 copy and a
float32 gradient of the same size. Here only labelled tokens go through the head, `chunk` rows at a
time, each block z cast to float32 after the matmul (as the plain path casts), and its gradient

    ∂loss/∂z_t = (softmax(z_t) − onehot(y_t)) / N

is formed in the same pass and turned into ∂h (and ∂W, ∂b where they train) at once: memory holds one
(chunk, V) block, and no logit is computed twice. Equal to the plain loss and gradients up to float
rounding (tests/test_loss.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_TOKENS = 2048


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk: int, grads: tuple[bool, bool, bool]) -> torch.Tensor:
        count = max(int(labels.numel()), 1)
        need_h, need_w, need_b = grads
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 for half precision, as the plain loss
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            z = F.linear(h, weight, bias).to(acc)
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(-1, y[:, None])[:, 0]).sum()
            if not any(grads):
                continue
            g = torch.exp(z.sub_(lse[:, None]))  # softmax, in z's memory
            g[torch.arange(len(y), device=y.device), y] -= 1.0
            g = g.div_(count).to(hidden.dtype)
            if need_h:
                grad_h[start:start + chunk] = g @ weight
            if need_w:
                grad_w.addmm_(g.T.to(acc), h.to(acc))
            if need_b:
                grad_b += g.to(acc).sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.grads, ctx.dtypes = grads, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        grad_h, grad_w, grad_b = ((next(saved) * grad_out).to(dtype) if need else None
                                  for need, dtype in zip(ctx.grads, ctx.dtypes, strict=True))
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    chunk: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(W h + b) against `labels` over the tokens whose label is not -100.

    hidden: (T, d), weight: (V, d), bias: (V,) or None, labels: (T,). Differentiable in hidden,
    weight and bias.
    """
    keep = (labels != IGNORE_INDEX).nonzero()[:, 0]
    h, y = hidden[keep], labels[keep]
    on = torch.is_grad_enabled()
    grads = (on and h.requires_grad, on and weight.requires_grad, on and bias is not None and bias.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, bias, y, chunk, grads)


def chunkable(model: nn.Module) -> bool:
    """Whether `model`'s logits are a plain linear head on its backbone's last hidden state."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    scaled = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return isinstance(head, nn.Linear) and decoder is not model and not scaled


def lm_loss(call: Callable[..., Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`call(**batch).loss`, the model's own loss (full logits), in a forward that keeps no KV cache.

    A training or validation forward continues nothing. The cache a model builds by default (its
    `use_cache`) is also what a regionally compiled layer (workers/compile.py) would specialise on, its
    own slot of it, one graph per layer.
    """
    return call(**batch, use_cache=False).loss


def causal_lm_loss(
    call: Callable[..., Any], model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = CHUNK_TOKENS
) -> torch.Tensor:
    """`lm_loss(call, batch)` (call: `model` or the DeepSpeed engine around it) without full logits.

    The model runs without labels and with `logits_to_keep=1`; a forward hook on its decoder (`get_decoder()`) takes
    the last hidden states (B, L, d), and `linear_cross_entropy` scores them against the labels
    shifted by one, as the models' own loss does. Where `chunkable(model)` is false: the plain loss.
    """
    if not chunkable(model):
        return lm_loss(call, batch)
    captured: list[torch.Tensor] = []
    handle = model.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        call(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{type(model).__name__}: its decoder ran {len(captured)} times in one forward")
    hidden = captured[0]
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:].to(hidden.device)
    head = model.get_output_embeddings()
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, labels.reshape(-1),
                                chunk)
