"""Decoding modes: each decides a request's next forward pass and interprets its logits."""

from __future__ import annotations

from server.engine.modes.ar import AutoregressiveMode
from server.engine.modes.base import DecodeMode
from server.engine.modes.diffusion import BlockDiffusionMode
from server.engine.modes.self_spec import SelfSpeculativeMode


def make_mode(name: str, mask_token_id: int | None) -> DecodeMode:
    if name == "ar":
        return AutoregressiveMode()
    if mask_token_id is None:
        raise ValueError(f"mode {name!r} needs a diffusion checkpoint (with a mask token); this model serves only 'ar'")
    if name == "diffusion":
        return BlockDiffusionMode(mask_token_id)
    if name == "self_spec":
        return SelfSpeculativeMode(mask_token_id)
    raise ValueError(f"unknown mode {name!r}")


__all__ = ["DecodeMode", "make_mode", "AutoregressiveMode", "BlockDiffusionMode", "SelfSpeculativeMode"]
