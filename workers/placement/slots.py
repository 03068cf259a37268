"""The one vocabulary for where an adapter goes.

Sublayers (`attn`, `mlp`) name a whole block inside its residual branch; linear roles name one
projection. Every sublayer is delimited by two linears of its family: it starts where the
entry linear reads its input and ends where the exit linear writes its output, just before the
residual add. That keeps injection down to wrapping linears on every family.
"""

from __future__ import annotations

from typing import Literal, get_args

Sublayer = Literal["attn", "mlp"]
LinearRole = Literal["q", "k", "v", "o", "gate", "up", "down"]
Slot = Literal["attn", "mlp", "q", "k", "v", "o", "gate", "up", "down"]

SUBLAYERS: tuple[str, ...] = get_args(Sublayer)
LINEAR_ROLES: tuple[str, ...] = get_args(LinearRole)
SLOTS: tuple[str, ...] = get_args(Slot)
QKV: tuple[str, ...] = ("q", "k", "v")

# (entry role, exit role) of each sublayer; `q` stands for the fused qkv linear where there is one.
SUBLAYER_BOUNDS: dict[str, tuple[str, str]] = {"attn": ("q", "o"), "mlp": ("up", "down")}
# The linears of each sublayer, for methods (LoRA) that read `attn` as "every attention linear".
SUBLAYER_ROLES: dict[str, tuple[str, ...]] = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
