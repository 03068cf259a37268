"""The family table is the specification of where each slot lives in each model family."""

from __future__ import annotations

import pytest
from tiny_models import TINY_CONFIGS, tiny_model

from workers.adapters.base import linear_dims
from workers.errors import ConfigError
from workers.placement import (
    FAMILIES,
    family_for,
    linear_targets,
    resolve_linear_roles,
    sublayer_targets,
)

ALL = tuple(TINY_CONFIGS)


@pytest.mark.parametrize("name", ALL)
def test_every_table_path_is_a_linear_of_the_right_shape(name: str) -> None:
    model = tiny_model(name)
    layout = family_for(model.config)
    hidden = model.config.hidden_size
    roles = [r for r in ("q", "k", "v", "o", "gate", "up", "down") if layout.has(r)]
    for target in linear_targets(model, layout, roles):
        d_in, d_out = linear_dims(model.get_submodule(target.path))
        if target.role in ("q", "qkv", "gate", "up"):
            assert d_in == hidden, target
        if target.role in ("o", "down"):
            assert d_out == hidden, target
    model.get_submodule(layout.backbone)


@pytest.mark.parametrize("name", ALL)
def test_sublayers_start_and_end_at_the_hidden_size(name: str) -> None:
    model = tiny_model(name)
    layout = family_for(model.config)
    targets = sublayer_targets(model, layout, ["attn", "mlp"])
    assert len(targets) == 2 * model.config.num_hidden_layers
    for t in targets:
        assert linear_dims(model.get_submodule(t.entry.path))[0] == model.config.hidden_size
        assert linear_dims(model.get_submodule(t.exit.path))[1] == model.config.hidden_size


def test_every_family_row_is_reachable_and_unique() -> None:
    types = [mt for fam in FAMILIES for mt in fam.model_types]
    assert len(types) == len(set(types))
    assert {family_for(c).name for c in TINY_CONFIGS.values()} == {f.name for f in FAMILIES}


@pytest.mark.parametrize(
    ("family", "roles", "expected"),
    [
        ("llama", ["q", "k", "v", "up", "down"], ["q", "k", "v", "up", "down"]),
        ("bloom", ["q", "k", "v", "up", "down"], ["qkv", "up", "down"]),
        ("gpt2", ["v", "q", "k"], ["qkv"]),
        ("gpt_neox", ["q", "k", "v", "o"], ["qkv", "o"]),
        ("opt", ["down", "q"], ["q", "down"]),
    ],
)
def test_roles_resolve_in_vocabulary_order_with_fused_qkv_once(family, roles, expected) -> None:
    assert resolve_linear_roles(family_for(TINY_CONFIGS[family]), roles) == expected


@pytest.mark.parametrize(
    ("family", "roles", "needle"),
    [
        ("bloom", ["gate"], "family 'bloom' has no 'gate' linear; it has: attn, mlp, q, k, v, o, up, down"),
        ("gpt_neox", ["k"], "fuses q, k and v into one linear"),
        ("opt", ["gate"], "family 'opt' has no 'gate'"),
        ("llama", ["kv"], "unknown linear role 'kv'"),
    ],
)
def test_placements_a_family_cannot_honour_are_errors(family, roles, needle) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_linear_roles(family_for(TINY_CONFIGS[family]), roles)
    assert err.value.field == "adapter.placement"
    assert needle in str(err.value)


def test_unknown_model_type_names_the_known_ones() -> None:
    class Fake:
        model_type = "mamba"

    with pytest.raises(ConfigError, match=r"unknown model type 'mamba'; expected one of: bloom, gpt2"):
        family_for(Fake())
