"""Regional compilation: each decoder layer compiled in place, the rest of the model eager.

The L decoder layers share one code path and one set of shapes, so `torch.compile` traces and
generates one layer's kernels and reuses them L times: compile time is that of one layer, not of
the model (the PyTorch recipe "regional compilation"). Adapters inside a layer are compiled with it;
embeddings, the LM head and the loss (workers/loss.py) stay eager.

`train.compile`: `None` (the default) compiles where it pays: on CUDA, not on a CPU, where
inductor's C++ build costs more than a short run saves, and not where the adapter makes each layer
trace a graph of its own (`AdapterLayer.shared_layer_graph`: prefix tuning); `true` or `false`
decide on any device. On CUDA inductor's kernels are Triton's, whose launchers Triton builds with a
C compiler as it first runs them: without one (a CUDA `base` image has none) the default does not
compile, and `true` is refused with the field named (every compiled trial failed at its first step).

Training and validation forwards keep no KV cache (`workers.loss.lm_loss`): each layer would trace
its own graph, on its own slot of the cache.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from workers.errors import ConfigError
from workers.placement import family_for

# The torch.compile backend; the GPU suite's `--tiny` sets "eager" to trace the same code on a CPU in seconds.
BACKEND = "inductor"


def c_compiler() -> str | None:
    """The C compiler Triton builds its CUDA launchers with, found as Triton finds it ($CC, gcc, clang)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def compile_enabled(setting: bool | None, on_gpu: bool, pays: bool = True, field: str = "train.compile") -> bool:
    """Whether to compile: the spec's `train.compile` (or `eval.compile`, `field`); where it is unset, on CUDA
    where it `pays` (one graph serves every layer) and Triton has a C compiler."""
    triton = on_gpu and BACKEND == "inductor"
    if setting is None:
        return on_gpu and pays and (not triton or c_compiler() is not None)
    if setting and triton and c_compiler() is None:
        raise ConfigError(None, field, "true: torch.compile on CUDA builds Triton kernels with a C compiler, and "
                                       "this machine has none ($CC, gcc, clang): install gcc, or set it false")
    return setting


def compile_backend() -> str:
    """The torch.compile backend in use (`BACKEND`, read when called so that `--tiny` can set it)."""
    return BACKEND


def compile_decoder_layers(model: nn.Module, backend: str | None = None) -> int:
    """Compile every decoder layer of `model` (a causal LM of a known family) in place; returns how many."""
    layers = model.get_submodule(family_for(model.config).layers)
    for layer in layers:
        layer.compile(backend=backend or BACKEND)
    return len(layers)


def uncompile_decoder_layers(model: nn.Module) -> None:
    """Undo `compile_decoder_layers`: every decoder layer of `model` runs eagerly again.

    Training's regional compilation ends with training. Evaluation runs its prefill eagerly and compiles its
    decoding step whole (workers/evaluate.py); through compiled layers its prefill traced each layer on its own
    slot of the KV cache (one graph per layer, up to dynamo's recompile limit) and filled the static cache inside
    a traced region, where transformers does not mark its tensors as the fixed addresses CUDA graphs need.
    """
    for layer in model.get_submodule(family_for(model.config).layers):
        layer._compiled_call_impl = None


def compile_counts() -> tuple[int, int]:
    """(graphs dynamo has compiled, frames it gave up on and ran eagerly) in this process so far.

    A timed call must add to neither: a compile inside it is warm-up counted as throughput, and a
    frame left eager (past `torch._dynamo.config.recompile_limit`, which every shape and every
    caller of one compiled function count against) is an eager figure labelled compiled.
    """
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["frames"]["total"] - counters["frames"]["ok"]
