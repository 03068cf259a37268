"""The bottleneck shared by series, parallel and MoSA adapters, and the wrappers that place it.

    f(x) = s · (W_up · act(W_down · dropout(x) + b_down) + b_up)      (biases only when `bias` is on)

W_down: d_in -> b and W_up: b -> d_out, with b the bottleneck size and s a fixed or learned scale.
Every placement reduces to wrapping linears (see workers/placement/slots.py):

    input side   (q, k, v, qkv, gate, up):  y = W (z + f(z))          `InputAdapter`
    output side  (o, down; attn, mlp):       y = h + f(h),  h = W x    `OutputAdapter`
    beside one linear:                       y = W z + b + f(z)        `ParallelLinear`
    beside a sublayer:  the entry linear's input z is tapped, the exit linear adds f(z) to its
                        output                                         `TapEntry` + `ParallelExit`

`residual: false` (series only, the PETL-AST residual study) drops the adapter's own skip:
y = W f(z) and y = f(h).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.adapters.base import AdapterLayer, adapter_dtype, linear_dims, replace_module
from workers.adapters.config import BottleneckOptions
from workers.errors import ConfigError
from workers.placement import FamilyLayout, LinearTarget, linear_targets, sublayer_targets
from workers.placement.slots import SUBLAYERS

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# Roles whose input is the sublayer's input: a series adapter there acts before the linear.
INPUT_SIDE = ("q", "k", "v", "qkv", "gate", "up")


class Bottleneck(AdapterLayer):
    """f(x) = s · (W_up · act(W_down · dropout(x) + b_down) + b_up).

    With `float32` set (`compute_dtype: float32`, the default) and a half-precision x, the projections
    run in float32 on x and weights cast up, and the result returns to x's dtype before the scale, as the reference's
    bottleneck.py: f(x) = cast(W_up · act(W_down · x)) · s.
    """

    def __init__(
        self, down: nn.Linear, up: nn.Linear, act: nn.Module, dropout: nn.Module, scale: float | nn.Parameter,
        float32: bool = True,
    ) -> None:
        super().__init__()
        self.dropout, self.down, self.act, self.up = dropout, down, act, up
        self.scale, self.float32 = scale, float32

    @classmethod
    def build(cls, opts: BottleneckOptions, d_in: int, d_out: int, like: torch.Tensor, **extra: Any) -> Bottleneck:
        """A new bottleneck d_in -> b -> d_out on `like`'s device and dtype, initialised per `opts.init`.

        `paper` is the paper code's `bert` init: both projections N(0, 0.02), biases zero. `zero` is its
        `mam_adapter` init: W_down keeps nn.Linear's default, W_up = 0, so f = 0 and the model is unchanged.
        """
        kw: dict[str, Any] = {"device": like.device, "dtype": adapter_dtype(like)}
        down = nn.Linear(d_in, opts.bottleneck, bias=opts.bias, **kw)
        up = nn.Linear(opts.bottleneck, d_out, bias=opts.bias, **kw)
        with torch.no_grad():
            if opts.init == "paper":
                nn.init.normal_(down.weight, std=0.02)
                nn.init.normal_(up.weight, std=0.02)
            else:
                nn.init.zeros_(up.weight)
            for lin in (down, up):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        scale = nn.Parameter(torch.ones((), **kw)) if opts.scaling == "learned" else float(opts.scaling)
        act, dropout = ACTIVATIONS[opts.activation](), nn.Dropout(opts.dropout)
        return cls(down, up, act, dropout, scale, opts.compute_dtype == "float32", **extra)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_down, W_up) as this forward uses them."""
        return self.down.weight, self.up.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_down, w_up = self.weights()
        b_down, b_up = self.down.bias, self.up.bias
        if self.float32 and x.dtype.itemsize < 4:  # half precision in, float32 inside
            w_down, w_up = w_down.float(), w_up.float()
            b_down, b_up = (None if b is None else b.float() for b in (b_down, b_up))
            h = F.linear(self.act(F.linear(self.dropout(x.float()), w_down, b_down)), w_up, b_up)
            return (h.to(x.dtype) * self.scale).to(x.dtype)  # a learned scale is float32 beside an 8-bit base
        # In the weights' dtype and back: float32 beside an 8-bit base; otherwise x's own, and no cast happens.
        h = F.linear(self.act(F.linear(self.dropout(x).to(w_down.dtype), w_down, b_down)), w_up, b_up)
        return (self.scale * h).to(x.dtype)


MakeBottleneck = Callable[[int, int, torch.Tensor], nn.Module]
"""(d_in, d_out, a weight of the wrapped linear for device and dtype) -> f."""


class InputAdapter(AdapterLayer):
    """y = W (z + f(z)), or W f(z) without the residual."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, residual: bool = True) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.residual = base_layer, adapter, residual

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = self.adapter(z)
        return self.base_layer(z + a if self.residual else a)


class OutputAdapter(AdapterLayer):
    """y = h + f(h) with h = W x, or f(h) without the residual."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, residual: bool = True) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.residual = base_layer, adapter, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        a = self.adapter(h)
        return h + a if self.residual else a


class ParallelLinear(AdapterLayer):
    """y = W z + b + f(z), f: in_features -> bottleneck -> out_features."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.base_layer(z) + self.adapter(z)


class Tap:
    """Carries a sublayer's input from its entry linear to its exit linear within one block call.

    Blocks run their linears in order, and gradient checkpointing re-runs a whole block in order,
    so the entry always writes before the exit reads. The exit empties the tap: no activation
    outlives the forward through the tap.
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class TapEntry(nn.Module):
    """The entry linear of a sublayer, recording its input z for the parallel adapter."""

    def __init__(self, base_layer: nn.Module, tap: Tap) -> None:
        super().__init__()
        self.base_layer, self.tap = base_layer, tap

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.tap.value = z
        return self.base_layer(z)


class ParallelExit(AdapterLayer):
    """The exit linear of a sublayer: y = W x + b + f(z), z the sublayer's input from the tap."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, tap: Tap) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.tap = base_layer, adapter, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, self.tap.value = self.tap.value, None
        if z is None:
            raise RuntimeError("parallel adapter: the sublayer's entry linear did not run before its exit")
        return self.base_layer(x) + self.adapter(z)


def unwrap(module: nn.Module) -> nn.Module:
    """The linear inside any wrappers (a parallel sublayer's entry may wrap a per-linear adapter)."""
    while hasattr(module, AdapterLayer.base_layer_attr):
        module = getattr(module, AdapterLayer.base_layer_attr)
    return module


def _dims(model: nn.Module, target: LinearTarget) -> tuple[int, int]:
    return linear_dims(unwrap(model.get_submodule(target.path)))


def _weight(module: nn.Module) -> torch.Tensor:
    return unwrap(module).weight


def check_bottleneck(opts: BottleneckOptions, d_in: int, d_out: int, where: str) -> None:
    """The bottleneck must be smaller than every dimension it compresses."""
    if opts.bottleneck >= min(d_in, d_out):
        raise ConfigError(
            None, "adapter.bottleneck",
            f"bottleneck {opts.bottleneck} is not smaller than the dimension it compresses "
            f"({min(d_in, d_out)} at {where})",
        )


def _split(placement: Sequence[str]) -> tuple[list[str], list[str]]:
    """(sublayers, linear roles) of a placement."""
    return [s for s in placement if s in SUBLAYERS], [s for s in placement if s not in SUBLAYERS]


def inject_series(
    model: nn.Module, layout: FamilyLayout, opts: BottleneckOptions, make: MakeBottleneck, residual: bool = True
) -> list[nn.Module]:
    """Series adapters after each named sublayer (its exit linear's output) and on each named role.

    Every target is checked before the model is touched: an error leaves it unchanged.
    """
    sublayers, roles = _split(opts.placement)
    sites = [(t.exit, "output") for t in sublayer_targets(model, layout, sublayers)]
    sites += [(t, "input" if t.role in INPUT_SIDE else "output") for t in linear_targets(model, layout, roles)]
    outputs = [t.path for t, side in sites if side == "output"]
    if len(outputs) != len(set(outputs)):
        raise ConfigError(
            None, "adapter.placement",
            f"{opts.placement} places two series adapters on the same output (attn is o's output, mlp is down's)",
        )
    sizes = []
    for target, side in sites:
        d_in, d_out = _dims(model, target)
        size = d_in if side == "input" else d_out
        check_bottleneck(opts, size, size, target.path)
        sizes.append(size)
    inserted: list[nn.Module] = []
    for (target, side), size in zip(sites, sizes, strict=True):
        base = model.get_submodule(target.path)
        wrap = InputAdapter if side == "input" else OutputAdapter
        inserted.append(wrap(base, make(size, size, _weight(base)), residual))
        replace_module(model, target.path, inserted[-1])
    return inserted


def inject_parallel(
    model: nn.Module, layout: FamilyLayout, opts: BottleneckOptions, make: MakeBottleneck
) -> list[nn.Module]:
    """Parallel adapters beside each named role and beside each named sublayer (entry input -> exit output).

    Every target is checked before the model is touched: an error leaves it unchanged.
    """
    sublayers, roles = _split(opts.placement)
    per_linear = linear_targets(model, layout, roles)
    besides = sublayer_targets(model, layout, sublayers)
    for target in per_linear:
        check_bottleneck(opts, *_dims(model, target), target.path)
    for sub in besides:
        d_in, d_out = _dims(model, sub.entry)[0], _dims(model, sub.exit)[1]
        check_bottleneck(opts, d_in, d_out, f"{layout.layers}.{sub.layer} {sub.name}")
    inserted: list[nn.Module] = []
    for target in per_linear:
        base = model.get_submodule(target.path)
        inserted.append(ParallelLinear(base, make(*_dims(model, target), _weight(base))))
        replace_module(model, target.path, inserted[-1])
    for sub in besides:
        tap = Tap()
        entry, exit_ = model.get_submodule(sub.entry.path), model.get_submodule(sub.exit.path)
        adapter = make(_dims(model, sub.entry)[0], _dims(model, sub.exit)[1], _weight(exit_))
        replace_module(model, sub.entry.path, TapEntry(entry, tap))
        inserted.append(ParallelExit(exit_, adapter, tap))
        replace_module(model, sub.exit.path, inserted[-1])
    return inserted
