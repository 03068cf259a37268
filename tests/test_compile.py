"""Regional compilation: on where it pays by default, and a compiled model computes what the eager one does."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from workers.adapters.config import CONFIGS
from workers.adapters.registry import inject
from workers.compile import compile_counts, compile_decoder_layers, compile_enabled
from workers.loss import causal_lm_loss
from workers.spec import TrainSpec


def test_compile_is_on_by_default_on_cuda_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "gcc")
    assert TrainSpec().compile is None
    assert [compile_enabled(None, gpu) for gpu in (False, True)] == [False, True]
    assert [compile_enabled(True, gpu) for gpu in (False, True)] == [True, True]
    assert [compile_enabled(False, gpu) for gpu in (False, True)] == [False, False]
    assert [compile_enabled(setting, True, pays=False) for setting in (None, True, False)] == [False, True, False]


def test_without_a_c_compiler_cuda_compiles_nothing_by_default_and_refuses_true(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path) -> None:
    """Triton builds its CUDA launchers with a C compiler as it first runs them; a CUDA `base` image has none."""
    from workers.errors import ConfigError

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no clang
    assert compile_enabled(None, True) is False
    with pytest.raises(ConfigError, match=r"^eval\.compile: true: .*C compiler"):
        compile_enabled(True, True, field="eval.compile")
    assert (compile_enabled(True, False), compile_enabled(False, True)) == (True, False)  # a CPU's is not Triton
    monkeypatch.setenv("CC", "/opt/cc")
    assert (compile_enabled(None, True), compile_enabled(True, True)) == (True, True)


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


TRAINED_METHODS = {  # placements every family has (fused q, k, v included)
    "lora": {"type": "lora", "placement": ["q", "k", "v", "down"], "rank": 4},
    "series": {"type": "series", "placement": ["mlp"], "bottleneck": 8},
    "parallel": {"type": "parallel", "placement": ["mlp"], "bottleneck": 8, "form": "sublayer"},
    "mosa": {"type": "mosa", "placement": ["mlp"], "bottleneck": 8, "consistency_weight": 0.1},
}


def _graphs_of_training(method: str, family: str, layers: int, methods: dict = TRAINED_METHODS) -> tuple[int, int]:
    """(graphs dynamo compiled, frames it left eager) for two training steps (the loss, the method's extra
    term, the backward) and a validation forward of a regionally compiled model `layers` deep."""
    from workers.adapters.registry import extra_loss
    from workers.loss import lm_loss

    torch._dynamo.reset()
    model = tiny_model(family, layers=layers)
    config = CONFIGS[method].model_validate(methods[method])
    inject(model, config)
    model.train()
    compile_decoder_layers(model, backend="eager")
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = compile_counts()
    for _ in range(2):
        loss = causal_lm_loss(model, model, batch)
        extra = extra_loss(model, batch, config)
        (loss if extra is None else loss + extra).backward()
    with torch.no_grad():
        lm_loss(model, batch)  # the trainer's validation forward
    after = compile_counts()
    return after[0] - before[0], after[1] - before[1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(TRAINED_METHODS))
def test_regional_compilation_traces_as_many_graphs_for_any_depth(method: str, family: str) -> None:
    """One layer's code is traced for every layer: 2 and 4 layers deep, the same few graphs (the first layer's
    input needs no gradient, the others' do; validation runs without gradients), and no frame left eager. A
    forward that builds a KV cache (a model's default, which a training step has no use for) made dynamo
    specialise each layer on its own slot of it: a graph per layer up to its recompile limit (8), and the layers
    past it eager."""
    shallow, deep = _graphs_of_training(method, family, 2), _graphs_of_training(method, family, 4)
    assert deep == shallow and deep[1] == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_tuning_traces_a_graph_per_layer_so_it_is_not_compiled_by_default(family: str) -> None:
    """Why `shared_layer_graph` is false for prefix tuning: its graphs grow with the depth (each layer reads its
    own cache slot). Should this ever pass with equal counts, compiling it by default would pay."""
    from workers.adapters.base import shares_layer_graphs

    methods = {**TRAINED_METHODS, "prefix": {"type": "prefix", "virtual_tokens": 3}}
    shallow, deep = (_graphs_of_training("prefix", family, n, methods) for n in (2, 4))
    assert deep[0] > shallow[0]
    prefix, lora = tiny_model(family), tiny_model(family)
    inject(prefix, CONFIGS["prefix"].model_validate(methods["prefix"]))
    inject(lora, CONFIGS["lora"].model_validate(TRAINED_METHODS["lora"]))
    assert (shares_layer_graphs(prefix), shares_layer_graphs(lora)) == (False, True)
