"""What a user writes under `adapter:`: each method's typed config, validated without torch.

The configs live apart from the layers (as PEFT keeps `config.py` apart from `layer.py`) so that a
sweep or trial file is checked, named and counted into trials without importing torch: `adaptune
run`, `status` and `report` start in about two seconds instead of six. Each method's module
(`series.py`, `parallel.py`, `prefix.py`, `lora.py`, `mosa.py`) holds its math and its injection and
refers to its config here; `registry.py` joins the two.

Each config also plans its adapter on a model it has not loaded (`planned_parameters`): from the
family's layout and the model's sizes alone, it refuses sizes the model cannot take and counts about
how many parameters the adapter trains. The pre-flight asks every trial's config, whatever its method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from workers.errors import ConfigError
from workers.placement import FamilyLayout, ModelShape, expand_sublayers, resolve_linear_roles, sublayer_dims
from workers.placement.slots import SLOTS, SUBLAYERS, Slot

ABBREV = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "g", "up": "u", "down": "d"}


def placement_tag(placement: Sequence[str]) -> str:
    """`[q, k, v, up, down]` -> `qkvud`; sublayers keep their names: `[attn, mlp, down]` -> `attn-mlp-d`.

    Slots come in vocabulary order, so the same placement always has the same tag.
    """
    ordered = [s for s in SLOTS if s in placement]
    subs = [s for s in ordered if s in SUBLAYERS]
    roles = "".join(ABBREV[s] for s in ordered if s not in SUBLAYERS)
    return "-".join([*subs, *([roles] if roles else [])])


class AdapterConfig(BaseModel):
    """Base of every method's config. Unknown fields are errors: a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str

    def short_name(self) -> str:
        """A compact, human-readable tag of this config (run names: `lora-r32-qkvud`)."""
        return self.type

    def planned_parameters(self, layout: FamilyLayout, shape: ModelShape) -> int:
        """About how many parameters this adapter trains on a model of `shape` in family `layout`,
        without torch or weights; a `ConfigError` on the field (`adapter.rank`, `adapter.placement`)
        when the model cannot take it. Every method's config defines it: this default refuses."""
        raise ConfigError(None, "adapter.type",
                          f"adapter type {self.type!r} cannot be checked before it runs: its config "
                          f"{type(self).__name__} defines no planned_parameters(layout, shape)")


class BottleneckOptions(AdapterConfig):
    """Options every bottleneck method takes."""

    placement: list[Slot] = Field(min_length=1)
    bottleneck: int = Field(gt=0, description="the bottleneck size b")
    activation: Literal["tanh", "relu", "gelu", "silu"] = "tanh"
    scaling: float | Literal["learned"] = Field(1.0, description="s; `learned`: one scalar parameter, from 1.0")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["paper", "zero"] = Field("paper", description="paper: N(0, 0.02) both; zero: W_up = 0 (identity)")
    bias: bool = False
    compute_dtype: Literal["float32", "model"] = Field(
        "float32", description="float32: f runs in float32 and returns in the model's dtype, as the reference; "
                               "model: f runs in the dtype of its weights")

    @field_validator("scaling", mode="before")
    @classmethod
    def _number_or_learned(cls, value: object) -> object:
        # Else pydantic reports the union's first member alone: "adapter.scaling.float: not a number".
        if value != "learned" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("expected a number or 'learned'")
        return value

    @model_validator(mode="after")
    def _unique_placement(self) -> BottleneckOptions:
        if len(set(self.placement)) != len(self.placement):
            raise ValueError(f"placement {self.placement} names a slot twice")
        return self

    def option_tags(self) -> list[str]:
        """The options that differ from their defaults, compactly (`relu`, `slearned`, `zinit`, ...)."""
        tags = [] if self.activation == "tanh" else [self.activation]
        if self.scaling != 1.0:
            tags.append(f"s{self.scaling:g}" if isinstance(self.scaling, float) else f"s{self.scaling}")
        if self.dropout:
            tags.append(f"do{self.dropout:g}")
        if self.init != "paper":
            tags.append(f"{self.init[0]}init")
        if self.bias:
            tags.append("bias")
        if self.compute_dtype != "float32":
            tags.append(f"{self.compute_dtype}dtype")
        return tags

    def short_name(self) -> str:
        return "-".join([self.type, f"b{self.bottleneck}", placement_tag(self.placement), *self.option_tags()])

    def bottleneck_parameters(self, layout: FamilyLayout, shape: ModelShape,
                              linear_site: Callable[[str, int, int], tuple[int, int]]) -> int:
        """`planned_parameters` of a bottleneck b at each slot: b (d_in + d_out) per site and block, for
        a sublayer its input and output sizes, for a linear role the sizes `linear_site(role, d_in,
        d_out)` gives (the method's own: what its adapter reads and writes there)."""
        roles = resolve_linear_roles(layout, [s for s in self.placement if s not in SUBLAYERS])
        sites = [(sub, *sublayer_dims(layout, shape, sub)) for sub in self.placement if sub in SUBLAYERS]
        sites += [(role, *linear_site(role, *shape.dims[role])) for role in roles]
        for where, d_in, d_out in sites:
            if self.bottleneck >= min(d_in, d_out):
                raise ConfigError(None, "adapter.bottleneck",
                                  f"bottleneck {self.bottleneck} is not smaller than the dimension it compresses "
                                  f"({min(d_in, d_out)} at {where} of {layout.name})")
        return sum(self.bottleneck * (d_in + d_out) for _, d_in, d_out in sites) * shape.layers


# --- series ----------------------------------------------------------------------------------------

PRESETS: dict[str, list[str]] = {"houlsby": ["attn", "mlp"], "pfeiffer": ["mlp"]}


class SeriesConfig(BottleneckOptions):
    """Series adapter (Houlsby; Pfeiffer): h' = h + f(h) after a sublayer. Math and injection: series.py."""

    type: Literal["series"] = "series"
    residual: bool = True

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """`preset: houlsby` stands for its placement, which is what the config keeps."""
        if isinstance(data, dict) and "preset" in data:
            data = dict(data)
            preset = data.pop("preset")
            if "placement" in data:
                raise ValueError("give either preset or placement, not both")
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; expected one of: {', '.join(PRESETS)}")
            data["placement"] = PRESETS[preset]
        return data

    def option_tags(self) -> list[str]:
        return [*super().option_tags(), *([] if self.residual else ["nores"])]

    def planned_parameters(self, layout: FamilyLayout, shape: ModelShape) -> int:
        return self.bottleneck_parameters(layout, shape, _series_site)


def _series_site(role: str, d_in: int, d_out: int) -> tuple[int, int]:
    """A series adapter at a linear acts on the hidden side: the input of q, k, v, gate, up, else the output."""
    size = d_in if role in ("q", "k", "v", "qkv", "gate", "up") else d_out
    return size, size


# --- parallel --------------------------------------------------------------------------------------

ParallelForm = Literal["linear", "sublayer", "mixed"]


def parallel_form(placement: Sequence[str]) -> ParallelForm:
    """`linear` when every slot is a linear role, `sublayer` when every slot is attn or mlp."""
    subs = {s in SUBLAYERS for s in placement}
    return "mixed" if len(subs) > 1 else "sublayer" if subs == {True} else "linear"


class ParallelConfig(BottleneckOptions):
    """Parallel adapter: y = W z + b + f(z) beside each named linear (`linear`, the form of the reference
    code, its comparison tables and default), or y = g(x) + f(x) beside a sublayer g (`sublayer`, He et
    al.'s). Math and injection: parallel.py.

    `form` follows from the placement; stating it makes a study say which form it means, and a
    placement of the other form is then an error. Names tell the forms apart: `parallel-b256-ud`
    (linear), `parallel-sublayer-b256-mlp`.
    """

    type: Literal["parallel"] = "parallel"
    form: ParallelForm = Field("linear", description="linear (the reference's) | sublayer (He et al.) | mixed")

    @model_validator(mode="before")
    @classmethod
    def _form_of_placement(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("placement"), list):
            form = parallel_form(data["placement"])
            if data.get("form", form) != form:
                raise ValueError(f"placement {data['placement']} is the {form} form, not {data['form']}")
            data = {**data, "form": form}
        return data

    def short_name(self) -> str:
        name = super().short_name()
        return name if self.form == "linear" else name.replace("parallel-", f"parallel-{self.form}-", 1)

    def planned_parameters(self, layout: FamilyLayout, shape: ModelShape) -> int:
        # Beside a linear, f reads its input and writes its output.
        return self.bottleneck_parameters(layout, shape, lambda role, d_in, d_out: (d_in, d_out))


# --- prefix ----------------------------------------------------------------------------------------

class PrefixConfig(AdapterConfig):
    """Prefix tuning (Li & Liang): n virtual key/value tokens per layer. Math and injection: prefix.py."""

    type: Literal["prefix"] = "prefix"
    virtual_tokens: int = Field(gt=0, description="n, the number of virtual tokens")
    reparametrize: bool = False
    prefix_hidden: int = Field(512, gt=0, description="width of the reparametrisation MLP")

    def short_name(self) -> str:
        return f"prefix-v{self.virtual_tokens}" + ("-mlp" if self.reparametrize else "")

    def planned_parameters(self, layout: FamilyLayout, shape: ModelShape) -> int:
        """n key and value vectors per block; reparametrised, an MLP hidden -> prefix_hidden -> 2 hidden L."""
        d, n_layers = shape.hidden, shape.layers
        mlp = self.prefix_hidden * (d + 2 * d * n_layers) if self.reparametrize else 0
        return self.virtual_tokens * 2 * d * n_layers + mlp


# --- lora ------------------------------------------------------------------------------------------

class LoraConfig(AdapterConfig):
    """LoRA (Hu et al.): y = W x + (alpha / r) B A dropout(x). Math and injection: lora.py."""

    type: Literal["lora"] = "lora"
    placement: list[Slot] = Field(min_length=1)
    rank: int = Field(gt=0, description="r")
    alpha: float | None = Field(None, gt=0, description="alpha; default 2 r (the paper: r 32, alpha 64)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    rslora: bool = False

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def short_name(self) -> str:
        return f"lora-r{self.rank}-{placement_tag(list(self.placement))}"

    def planned_parameters(self, layout: FamilyLayout, shape: ModelShape) -> int:
        """r (d_in + d_out) per linear and block; `attn` and `mlp` stand for those of their linears the family has."""
        roles = expand_sublayers(self.placement)
        if any(s in SUBLAYERS for s in self.placement):
            roles = [r for r in roles if layout.has(r)]
        total = 0
        for role in resolve_linear_roles(layout, roles):
            d_in, d_out = shape.dims[role]
            if self.rank > min(d_in, d_out):
                raise ConfigError(None, "adapter.rank", f"rank {self.rank} exceeds the layer {role} "
                                                        f"({d_in} -> {d_out}) of {layout.name}")
            total += self.rank * (d_in + d_out)
        return total * shape.layers


# --- mosa ------------------------------------------------------------------------------------------

class MosaConfig(BottleneckOptions):
    """MoSA: a bottleneck split into N sparse parts, merged after training. Math and injection: mosa.py."""

    type: Literal["mosa"] = "mosa"
    base: Literal["series", "parallel"] = "series"
    parts: int = Field(4, ge=2, le=255, description="N, the number of sparse parts")
    consistency_weight: float = Field(0.0, ge=0.0, description="weight of the symmetric-KL consistency term")
    mask_seed: int = 0

    def dense(self) -> SeriesConfig | ParallelConfig:
        """The config of the dense adapter the parts merge into: the base method, the same options."""
        shared = self.model_dump(include=set(BottleneckOptions.model_fields) - {"type"})
        return SeriesConfig(**shared) if self.base == "series" else ParallelConfig(**shared)

    def planned_parameters(self, layout: FamilyLayout, shape: ModelShape) -> int:
        """As its dense adapter: the N parts are masks over one bottleneck of the dense adapter's sizes."""
        return self.dense().planned_parameters(layout, shape)

    def short_name(self) -> str:
        tags = [*self.option_tags(), *([f"cw{self.consistency_weight:g}"] if self.consistency_weight else [])]
        head = [self.type, self.base, f"b{self.bottleneck}", f"n{self.parts}", placement_tag(self.placement)]
        return "-".join([*head, *tags])


# Method name -> its config class: the built-in methods', and any `register_config` adds.
CONFIGS: dict[str, type[AdapterConfig]] = {
    cls.model_fields["type"].default: cls
    for cls in (SeriesConfig, ParallelConfig, PrefixConfig, LoraConfig, MosaConfig)
}


def register_config(cls: type[AdapterConfig]) -> None:
    """Make `cls` the config of the method its `type` field's default names, in every spec from now on."""
    name = cls.model_fields["type"].default
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__}.type needs a default: the method's name")
    if CONFIGS.get(name, cls) is not cls:
        raise ValueError(f"adapter type {name!r} already has a config: {CONFIGS[name].__name__}")
    CONFIGS[name] = cls


def _validate_adapter(value: Any) -> AdapterConfig:
    """The config of `CONFIGS[value["type"]]`; an error as pydantic reports a discriminated union's."""
    if isinstance(value, AdapterConfig):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("model_attributes_type",
                                  "Input should be a valid dictionary or object to extract fields from")
    if "type" not in value:
        raise PydanticCustomError("union_tag_not_found", "Unable to extract tag using discriminator {discriminator}",
                                  {"discriminator": "'type'"})
    tag, tags = value["type"], ", ".join(repr(name) for name in CONFIGS)
    if not isinstance(tag, str) or tag not in CONFIGS:
        raise PydanticCustomError(
            "union_tag_invalid",
            "Input tag '{tag}' found using {discriminator} does not match any of the expected tags: {expected_tags}",
            {"discriminator": "'type'", "tag": str(tag), "expected_tags": tags},
        )
    return CONFIGS[tag].model_validate(value)


def _dump_adapter(value: AdapterConfig, info: SerializationInfo) -> dict[str, Any]:
    return value.model_dump(mode=info.mode)


# A field of this type takes any registered method's config, chosen by `type` (a discriminated union
# over `CONFIGS`, open to `register_config`), and dumps the config it holds, every field of it.
AdapterSpec = Annotated[
    AdapterConfig,
    PlainValidator(_validate_adapter),
    PlainSerializer(_dump_adapter),
]
