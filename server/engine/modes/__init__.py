"""Decoding modes: each decides a request's next forward pass and interprets its logits.

Importing this package registers the built-in modes; everything else asks the registry."""

from __future__ import annotations

from server.engine.modes.ar import AutoregressiveMode
from server.engine.modes.auto import AutoMode
from server.engine.modes.base import DecodeMode
from server.engine.modes.diffusion import BlockDiffusionMode
from server.engine.modes.registry import (
    all_modes,
    get_mode,
    load_model_defaults,
    mode_names,
    modes_honouring,
    register,
    resolve_decode,
    unregister,
    work_kind_names,
    work_kinds,
)
from server.engine.modes.self_spec import SelfSpeculativeMode

for _mode in (AutoregressiveMode(), BlockDiffusionMode(), SelfSpeculativeMode(), AutoMode()):
    register(_mode)

__all__ = [
    "DecodeMode",
    "AutoregressiveMode",
    "AutoMode",
    "BlockDiffusionMode",
    "SelfSpeculativeMode",
    "all_modes",
    "get_mode",
    "load_model_defaults",
    "mode_names",
    "modes_honouring",
    "register",
    "resolve_decode",
    "unregister",
    "work_kind_names",
    "work_kinds",
]
