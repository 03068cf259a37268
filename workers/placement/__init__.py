"""Where adapters go: the slot vocabulary and one table row per model family."""

from workers.placement.families import (
    FAMILIES,
    FamilyLayout,
    LinearTarget,
    SublayerTarget,
    expand_sublayers,
    family_for,
    linear_targets,
    resolve_linear_roles,
    sublayer_targets,
)
from workers.placement.shape import ModelShape, sublayer_dims
from workers.placement.slots import LINEAR_ROLES, SLOTS, SUBLAYERS, LinearRole, Slot, Sublayer

__all__ = [
    "FAMILIES",
    "LINEAR_ROLES",
    "SLOTS",
    "SUBLAYERS",
    "FamilyLayout",
    "LinearRole",
    "LinearTarget",
    "ModelShape",
    "Slot",
    "Sublayer",
    "SublayerTarget",
    "expand_sublayers",
    "family_for",
    "linear_targets",
    "resolve_linear_roles",
    "sublayer_dims",
    "sublayer_targets",
]
