"""Model families as data: one row per family maps slots to module names.

Adding a family is adding a row to `FAMILIES`; nothing else in adaptune names a module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.errors import ConfigError
from workers.placement.slots import LINEAR_ROLES, QKV, SLOTS, SUBLAYER_BOUNDS, SUBLAYER_ROLES

if TYPE_CHECKING:  # the tables are plain data: torch only names the types of what they are applied to
    from torch import nn
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class FamilyLayout:
    """Where things are in one model family.

    `backbone` is the decoder stack that takes `attention_mask` and `past_key_values`;
    `layers` the list of decoder blocks; `linears` maps each linear role to its path inside a
    block; `fused_qkv` is the single linear that computes q, k and v together, where there is one.
    """

    name: str
    model_types: tuple[str, ...]
    backbone: str
    layers: str
    linears: Mapping[str, str]
    fused_qkv: str | None = None
    # Packed rows need a 4-D block-diagonal mask; BLOOM, which derives ALiBi from a 2-D mask, does
    # not take one.
    packs: bool = True

    def has(self, role: str) -> bool:
        return role in self.linears or (role in QKV and self.fused_qkv is not None)

    def available(self) -> list[str]:
        """The slots this family can honour, in vocabulary order."""
        roles = [r for r in LINEAR_ROLES if self.has(r)]
        return [s for s in SLOTS if s in roles or (s in SUBLAYER_BOUNDS and self._bounded(s))]

    def _bounded(self, sublayer: str) -> bool:
        return all(self.has(r) for r in SUBLAYER_BOUNDS[sublayer])

    def check_packing(self, packing: bool) -> None:
        """Refuse `data.packing` where the family cannot take packed rows."""
        if packing and not self.packs:
            raise ConfigError(None, "data.packing", f"family {self.name!r} cannot take packed rows (4-D masks)")


FAMILIES: tuple[FamilyLayout, ...] = (
    FamilyLayout(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        backbone="model",
        layers="model.layers",
        linears={
            "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
        },
    ),
    FamilyLayout(
        name="bloom",
        model_types=("bloom",),
        backbone="transformer",
        layers="transformer.h",
        linears={"o": "self_attention.dense", "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
        fused_qkv="self_attention.query_key_value",
        packs=False,
    ),
    FamilyLayout(
        name="opt",
        model_types=("opt",),
        backbone="model.decoder",
        layers="model.decoder.layers",
        linears={
            "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.out_proj", "up": "fc1", "down": "fc2",
        },
    ),
    FamilyLayout(
        name="gptj",
        model_types=("gptj",),
        backbone="transformer",
        layers="transformer.h",
        linears={
            "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj",
            "up": "mlp.fc_in", "down": "mlp.fc_out",
        },
    ),
    FamilyLayout(
        name="gpt2",
        model_types=("gpt2",),
        backbone="transformer",
        layers="transformer.h",
        linears={"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        fused_qkv="attn.c_attn",
    ),
    FamilyLayout(
        name="gpt_neox",
        model_types=("gpt_neox",),
        backbone="gpt_neox",
        layers="gpt_neox.layers",
        linears={"o": "attention.dense", "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
        fused_qkv="attention.query_key_value",
    ),
)

_BY_MODEL_TYPE: dict[str, FamilyLayout] = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def family_for(config: PretrainedConfig) -> FamilyLayout:
    """The layout of the family `config.model_type` belongs to."""
    model_type = getattr(config, "model_type", None)
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise ConfigError(None, "model", f"unknown model type {model_type!r}; expected one of: {known}") from None


@dataclass(frozen=True)
class LinearTarget:
    """One linear to wrap: its block index, its role (`qkv` for a fused linear) and full path."""

    layer: int
    role: str
    path: str


@dataclass(frozen=True)
class SublayerTarget:
    """A sublayer of one block, delimited by the input of `entry` and the output of `exit`."""

    layer: int
    name: str
    entry: LinearTarget
    exit: LinearTarget


def _role_path(layout: FamilyLayout, role: str) -> tuple[str, str]:
    if role in QKV and layout.fused_qkv is not None:
        return "qkv", layout.fused_qkv
    return role, layout.linears[role]


def resolve_linear_roles(
    layout: FamilyLayout, roles: Sequence[str], field_name: str = "adapter.placement"
) -> list[str]:
    """Check `roles` against the family; fused q/k/v collapse into one `qkv` role.

    Returns the roles to wrap in each block, in vocabulary order.
    """
    wanted = set(roles)
    for role in roles:
        if role not in LINEAR_ROLES:
            expected = ", ".join(LINEAR_ROLES)
            raise ConfigError(None, field_name, f"unknown linear role {role!r}; expected one of: {expected}")
        if not layout.has(role):
            raise ConfigError(
                None, field_name,
                f"family {layout.name!r} has no {role!r} linear; it has: {', '.join(layout.available())}",
            )
    asked_qkv = wanted & set(QKV)
    if layout.fused_qkv is not None and asked_qkv and asked_qkv != set(QKV):
        raise ConfigError(
            None, field_name,
            f"family {layout.name!r} fuses q, k and v into one linear ({layout.fused_qkv}); "
            f"target all of [q, k, v] or none, not {sorted(asked_qkv)}",
        )
    resolved: list[str] = []
    for role in LINEAR_ROLES:
        if role in wanted:
            name, _ = _role_path(layout, role)
            if name not in resolved:
                resolved.append(name)
    return resolved


def expand_sublayers(roles_or_sublayers: Sequence[str]) -> list[str]:
    """`attn` and `mlp` as the linears they contain (for methods that act per linear only)."""
    out: list[str] = []
    for slot in roles_or_sublayers:
        for role in SUBLAYER_ROLES.get(slot, (slot,)):
            if role not in out:
                out.append(role)
    return out


def _path(layout: FamilyLayout, layer: int, role: str) -> str:
    rel = layout.fused_qkv if role == "qkv" else layout.linears[role]
    return f"{layout.layers}.{layer}.{rel}"


def num_layers(model: nn.Module, layout: FamilyLayout) -> int:
    return len(model.get_submodule(layout.layers))


def linear_targets(
    model: nn.Module, layout: FamilyLayout, roles: Sequence[str], field_name: str = "adapter.placement"
) -> list[LinearTarget]:
    """Every (block, role) linear that `roles` names, over all blocks, checked against the family."""
    resolved = resolve_linear_roles(layout, roles, field_name)
    return [
        LinearTarget(layer=i, role=role, path=_path(layout, i, role))
        for i in range(num_layers(model, layout))
        for role in resolved
    ]


def sublayer_targets(
    model: nn.Module, layout: FamilyLayout, sublayers: Sequence[str], field_name: str = "adapter.placement"
) -> list[SublayerTarget]:
    """Every (block, sublayer) that `sublayers` names, with its entry and exit linears."""
    out: list[SublayerTarget] = []
    for name in sublayers:
        if name not in SUBLAYER_BOUNDS:
            raise ConfigError(None, field_name, f"unknown sublayer {name!r}; expected attn or mlp")
    for i in range(num_layers(model, layout)):
        for name in sublayers:
            entry_role, exit_role = (_role_path(layout, r)[0] for r in SUBLAYER_BOUNDS[name])
            out.append(
                SublayerTarget(
                    layer=i, name=name,
                    entry=LinearTarget(i, entry_role, _path(layout, i, entry_role)),
                    exit=LinearTarget(i, exit_role, _path(layout, i, exit_role)),
                )
            )
    return out
