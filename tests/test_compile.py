"""Regional compilation: on where it pays by default, and a compiled model computes what the eager one does."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

from workers.adapters.config import CONFIGS
from workers.adapters.registry import inject
from workers.compile import compile_decoder_layers, compile_enabled
from workers.loss import causal_lm_loss
from workers.spec import TrainSpec


def test_compile_is_on_by_default_on_cuda_only() -> None:
    assert TrainSpec().compile is None
    assert [compile_enabled(None, gpu) for gpu in (False, True)] == [False, True]
    assert [compile_enabled(True, gpu) for gpu in (False, True)] == [True, True]
    assert [compile_enabled(False, gpu) for gpu in (False, True)] == [False, False]


@pytest.mark.parametrize("adapter", [
    {"type": "lora", "placement": ["q", "v", "down"], "rank": 4},
    {"type": "parallel", "placement": ["mlp"], "bottleneck": 8, "form": "sublayer"},
    {"type": "prefix", "virtual_tokens": 3},
])
def test_compiled_layers_give_the_eager_loss_and_gradients(adapter: dict) -> None:
    eager = tiny_model("llama")
    inject(eager, CONFIGS[adapter["type"]].model_validate(adapter))
    for p in eager.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    eager.eval()  # the adapter's dropout too
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled, backend="eager") == 2
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses, grads = [], []
    for model in (eager, compiled):
        loss = causal_lm_loss(model, model, batch)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(losses[1], losses[0])
    for g, e in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g, e)
