"""The registry of decoding modes, and the resolution of a request's decoding parameters.

Every layer that needs to know about modes asks here: the engine and scheduler (which mode
runs a request), the API (valid names, usage extras), metrics (label values, histograms),
the CLI and config (choices). A mode is registered once, by ``server.engine.modes`` for the
built-in ones, or by whoever adds one (a test registers a toy mode).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.engine.modes.base import DecodeMode
from server.engine.params import (
    PENALTY_FIELDS,
    DecodeParams,
    ModeParams,
    ParamError,
    ResolveContext,
    SamplingParams,
    check_knob,
)
from server.engine.work import WorkKind

_MODES: dict[str, DecodeMode] = {}

MODEL_DEFAULTS_KEY = "nld_decoding"  # generation_config.json: {mode: {knob: value}}


def register(mode: DecodeMode) -> DecodeMode:
    """Add a mode under ``mode.name``. Its work kinds must not clash with registered ones."""
    assert mode.name not in _MODES, f"mode {mode.name!r} is already registered"
    known = {k.name: k for k in work_kinds()}
    for kind in mode.work_kinds:
        assert known.get(kind.name, kind) == kind, f"work kind {kind.name!r} is already registered differently"
    _MODES[mode.name] = mode
    return mode


def unregister(name: str) -> None:
    _MODES.pop(name, None)


def mode_names() -> tuple[str, ...]:
    return tuple(_MODES)


def all_modes() -> tuple[DecodeMode, ...]:
    return tuple(_MODES.values())


def get_mode(name: str) -> DecodeMode:
    """The mode called ``name``; ParamError("mode") if there is none."""
    mode = _MODES.get(name)
    if mode is None:
        raise ParamError("mode", f"unknown mode {name!r}; expected one of {', '.join(_MODES)}")
    return mode


def work_kinds() -> tuple[WorkKind, ...]:
    """Every registered mode's work kinds, each once, in registration order."""
    seen: dict[str, WorkKind] = {}
    for mode in _MODES.values():
        for kind in mode.work_kinds:
            seen.setdefault(kind.name, kind)
    return tuple(seen.values())


def work_kind_names() -> tuple[str, ...]:
    return tuple(k.name for k in work_kinds())


def modes_honouring(field: str) -> tuple[str, ...]:
    """Names of the modes that honour a request field (a decode knob, ``logprobs`` or a penalty)."""
    if field == "logprobs":
        return tuple(m.name for m in _MODES.values() if m.supports_logprobs)
    if field in PENALTY_FIELDS:
        return tuple(m.name for m in _MODES.values() if m.honours_penalties)
    return tuple(m.name for m in _MODES.values() if field in m.knobs)


def _not_honoured(field: str, mode: str) -> ParamError:
    return ParamError(field, f"'{field}' is not supported in mode '{mode}' (only in: {', '.join(modes_honouring(field))}).")


def resolve_decode(decode: DecodeParams, sampling: SamplingParams, ctx: ResolveContext) -> ModeParams:
    """The request's mode params with every knob filled, checked against the model.

    Each knob comes from, in order: the request, the server's setting (``ctx.server_defaults``),
    the model folder's ``generation_config.json`` (``ctx.model_defaults``), the mode's
    built-in default. Raises ParamError naming the field at fault."""
    mode = get_mode(decode.mode)
    if mode.needs_mask_token and ctx.mask_token_id is None:
        causal = [m.name for m in _MODES.values() if not m.needs_mask_token]
        raise ParamError(
            "mode", f"mode {mode.name!r} needs a diffusion checkpoint (with a mask token); this model serves only {causal}"
        )
    asked = decode.knobs()
    for name in asked:
        if name not in mode.knobs:
            raise _not_honoured(name, mode.name)
    if sampling.logprobs is not None and not mode.supports_logprobs:
        raise _not_honoured("logprobs", mode.name)
    penalties = sampling.controls.penalties_set()
    if penalties and not mode.honours_penalties:
        raise _not_honoured(penalties[0], mode.name)
    model = ctx.model_defaults.get(mode.name, {})
    values: dict[str, Any] = {}
    for knob in mode.knobs:
        for source in (asked, ctx.server_defaults, model):
            if knob in source:
                values[knob] = source[knob]
                break
        else:
            values[knob] = mode.default(knob, values, ctx)
    params = mode.make_params(values, ctx)
    mode.check_sampling(params, sampling)
    size, knob = mode.largest_pass(params)
    if size > ctx.max_pass_tokens:
        raise ParamError(
            knob, f"a {mode.name} pass of {size} tokens exceeds the per-step token budget ({ctx.max_pass_tokens})"
        )
    return params


def load_model_defaults(model_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The ``nld_decoding`` entry of a model folder's ``generation_config.json`` ({} if none),
    validated: every mode registered, every knob honoured by its mode and in range.
    Raises ValueError naming the offending key."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    entry = json.loads(path.read_text()).get(MODEL_DEFAULTS_KEY)
    if entry is None:
        return {}
    where = f"{path}: {MODEL_DEFAULTS_KEY}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object of mode -> {{knob: value}}")
    out: dict[str, dict[str, Any]] = {}
    for mode_name, knobs in entry.items():
        if mode_name not in _MODES:
            raise ValueError(f"{where}.{mode_name}: unknown mode; expected one of {', '.join(_MODES)}")
        if not isinstance(knobs, dict):
            raise ValueError(f"{where}.{mode_name} must be an object of knob -> value")
        mode = _MODES[mode_name]
        for knob, value in knobs.items():
            if knob not in mode.knobs:
                raise ValueError(f"{where}.{mode_name}.{knob}: mode {mode_name!r} honours only {list(mode.knobs)}")
            try:
                check_knob(knob, value)
            except ParamError as exc:
                raise ValueError(f"{where}.{mode_name}.{knob}: {exc}") from None
        out[mode_name] = dict(knobs)
    return out
