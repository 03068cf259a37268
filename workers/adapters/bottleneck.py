"""The bottleneck shared by series, parallel and MoSA adapters, and the wrappers that place it.

    f(x) = s · W_up · act(W_down · dropout(x))        (+ biases when `bias` is on)

W_down: d_in -> b and W_up: b -> d_out, with b the bottleneck size and s a fixed or learned scale.
Every placement reduces to wrapping linears (see workers/placement/slots.py):

    input side   (q, k, v, gate, up):  y = W (z + s·f(z))            `InputAdapter`
    output side  (o, down, sublayer):  y = h + s·f(h),  h = W x       `OutputAdapter`
    beside       (per-linear parallel): y = W z + b + s·f(z)         `ParallelLinear`
    beside a sublayer:  the entry linear's input z is tapped, the exit linear adds s·f(z)
                        to its output                              `TapEntry` + `ParallelExit`

`residual: false` drops the adapter's own skip (z + s·f(z) becomes s·f(z)), for the residual
study of PETL-AST; it exists on series adapters only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from workers.adapters.base import AdapterConfig, AdapterLayer, replace_module
from workers.errors import ConfigError
from workers.placement import FamilyLayout, LinearTarget, Slot, linear_dims, linear_targets, sublayer_targets
from workers.placement.slots import SUBLAYERS

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
ABBREV = {"attn": "attn", "mlp": "mlp", "q": "q", "k": "k", "v": "v", "o": "o", "gate": "g", "up": "u", "down": "d"}


def placement_tag(placement: list[str]) -> str:
    """`[q, k, v, up, down]` -> `qkvud`; sublayers keep their names: `[attn, mlp]` -> `attn-mlp`."""
    subs = [s for s in placement if s in SUBLAYERS]
    roles = "".join(ABBREV[s] for s in placement if s not in SUBLAYERS)
    return "-".join([*subs, *([roles] if roles else [])])


class BottleneckOptions(AdapterConfig):
    """Options every bottleneck method takes."""

    placement: list[Slot] = Field(min_length=1)
    bottleneck: int = Field(gt=0, description="the bottleneck size b")
    activation: Literal["tanh", "relu", "gelu", "silu"] = "tanh"
    scaling: float | Literal["learned"] = 1.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["paper", "zero"] = Field("paper", description="paper: N(0, 0.02) both; zero: W_up = 0")
    bias: bool = False

    @model_validator(mode="after")
    def _unique_placement(self) -> BottleneckOptions:
        if len(set(self.placement)) != len(self.placement):
            raise ValueError(f"placement {self.placement} names a slot twice")
        return self

    def short_name(self) -> str:
        return f"{self.type}-b{self.bottleneck}-{placement_tag(list(self.placement))}"


class Bottleneck(AdapterLayer):
    """f(x) = s · W_up · act(W_down · dropout(x))."""

    def __init__(
        self, down: nn.Linear, up: nn.Linear, act: nn.Module, dropout: nn.Module, scale: torch.Tensor
    ) -> None:
        super().__init__()
        self.dropout, self.down, self.act, self.up = dropout, down, act, up
        if isinstance(scale, nn.Parameter):
            self.scale = scale
        else:
            self.register_buffer("scale", scale, persistent=False)

    @classmethod
    def build(cls, d_in: int, d_out: int, opts: BottleneckOptions, like: torch.Tensor) -> Bottleneck:
        """A new bottleneck d_in -> b -> d_out on `like`'s device and dtype, initialised per `opts.init`."""
        kw = {"device": like.device, "dtype": like.dtype}
        down = nn.Linear(d_in, opts.bottleneck, bias=opts.bias, **kw)
        up = nn.Linear(opts.bottleneck, d_out, bias=opts.bias, **kw)
        with torch.no_grad():
            # The paper's code initialises both projections N(0, 0.02) and biases with zeros.
            nn.init.normal_(down.weight, std=0.02)
            nn.init.zeros_(up.weight) if opts.init == "zero" else nn.init.normal_(up.weight, std=0.02)
            for lin in (down, up):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        scale = (
            nn.Parameter(torch.ones((), **kw)) if opts.scaling == "learned" else torch.tensor(float(opts.scaling), **kw)
        )
        return cls._from(down, up, ACTIVATIONS[opts.activation](), nn.Dropout(opts.dropout), scale, opts)

    @classmethod
    def _from(
        cls, down: nn.Linear, up: nn.Linear, act: nn.Module, dropout: nn.Module, scale: torch.Tensor,
        opts: BottleneckOptions,
    ) -> Bottleneck:
        return cls(down, up, act, dropout, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(self.dropout(x))))


class InputAdapter(AdapterLayer):
    """y = W (z + s·f(z)), or W (s·f(z)) without the residual."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, residual: bool = True) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.residual = base_layer, adapter, residual

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = self.adapter(z)
        return self.base_layer(z + a if self.residual else a)


class OutputAdapter(AdapterLayer):
    """y = h + s·f(h) with h = W x, or s·f(h) without the residual."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, residual: bool = True) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.residual = base_layer, adapter, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        a = self.adapter(h)
        return h + a if self.residual else a


class ParallelLinear(AdapterLayer):
    """y = W z + b + s·f(z), f: in_features -> bottleneck -> out_features."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.base_layer(z) + self.adapter(z)


class Tap:
    """Carries a sublayer's input from its entry linear to its exit linear within one block call."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class TapEntry(nn.Module):
    """The entry linear of a sublayer, recording its input for the parallel adapter."""

    def __init__(self, base_layer: nn.Module, tap: Tap) -> None:
        super().__init__()
        self.base_layer, self.tap = base_layer, tap

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.tap.value = z
        return self.base_layer(z)


class ParallelExit(AdapterLayer):
    """The exit linear of a sublayer: its output plus s·f(z) of the sublayer's input z."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, tap: Tap) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.tap = base_layer, adapter, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, self.tap.value = self.tap.value, None  # never keep activations past the forward
        if z is None:
            raise RuntimeError("parallel adapter: the sublayer's entry linear did not run before its exit")
        return self.base_layer(x) + self.adapter(z)


def unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def dims(model: nn.Module, target: LinearTarget) -> tuple[int, int]:
    return linear_dims(unwrap(model.get_submodule(target.path)))


def weight_of(model: nn.Module, target: LinearTarget) -> torch.Tensor:
    return unwrap(model.get_submodule(target.path)).weight


def check_bottleneck(opts: BottleneckOptions, d_in: int, d_out: int, where: str) -> None:
    if opts.bottleneck >= min(d_in, d_out):
        raise ConfigError(
            None, "adapter.bottleneck",
            f"bottleneck {opts.bottleneck} is not smaller than the dimension it compresses "
            f"({min(d_in, d_out)} at {where})",
        )



INPUT_SIDE = ("q", "k", "v", "qkv", "gate", "up")


def split_placement(opts: BottleneckOptions) -> tuple[list[str], list[str]]:
    """(sublayers, linear roles) of a placement."""
    return [s for s in opts.placement if s in SUBLAYERS], [s for s in opts.placement if s not in SUBLAYERS]


def inject_series(
    model: nn.Module, layout: FamilyLayout, opts: BottleneckOptions, make: type[Bottleneck],
    residual: bool = True,
) -> list[nn.Module]:
    """Series adapters: after each named sublayer (on its exit linear's output) and on each role."""
    sublayers, roles = split_placement(opts)
    outputs = [t.exit for t in sublayer_targets(model, layout, sublayers)]
    per_linear = linear_targets(model, layout, roles) if roles else []
    paths = [t.path for t in outputs] + [t.path for t in per_linear if t.role not in INPUT_SIDE]
    if len(paths) != len(set(paths)):
        raise ConfigError(
            None, "adapter.placement",
            f"{opts.placement} places two series adapters on the same output (attn is o's output, mlp is down's)",
        )
    inserted: list[nn.Module] = []
    for target in outputs + per_linear:
        d_in, d_out = dims(model, target)
        side_in = target in per_linear and target.role in INPUT_SIDE
        d = d_in if side_in else d_out
        check_bottleneck(opts, d, d, target.path)
        adapter = make.build(d, d, opts, weight_of(model, target))
        base = model.get_submodule(target.path)
        wrapper = InputAdapter(base, adapter, residual) if side_in else OutputAdapter(base, adapter, residual)
        replace_module(model, target.path, wrapper)
        inserted.append(wrapper)
    return inserted


def inject_parallel(
    model: nn.Module, layout: FamilyLayout, opts: BottleneckOptions, make: type[Bottleneck]
) -> list[nn.Module]:
    """Parallel adapters: beside each named sublayer (entry input -> exit output) and each role."""
    sublayers, roles = split_placement(opts)
    inserted: list[nn.Module] = []
    for target in linear_targets(model, layout, roles) if roles else []:
        d_in, d_out = dims(model, target)
        check_bottleneck(opts, d_in, d_out, target.path)
        adapter = make.build(d_in, d_out, opts, weight_of(model, target))
        wrapper = ParallelLinear(model.get_submodule(target.path), adapter)
        replace_module(model, target.path, wrapper)
        inserted.append(wrapper)
    for sub in sublayer_targets(model, layout, sublayers):
        d_in, d_out = dims(model, sub.entry)[0], dims(model, sub.exit)[1]
        check_bottleneck(opts, d_in, d_out, f"{layout.layers}.{sub.layer} {sub.name}")
        tap = Tap()
        adapter = make.build(d_in, d_out, opts, weight_of(model, sub.exit))
        replace_module(model, sub.entry.path, TapEntry(model.get_submodule(sub.entry.path), tap))
        wrapper = ParallelExit(model.get_submodule(sub.exit.path), adapter, tap)
        replace_module(model, sub.exit.path, wrapper)
        inserted.append(wrapper)
    return inserted
