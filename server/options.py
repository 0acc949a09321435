"""Server options: one table, four layers.

Every setting of ``python -m server`` (and the engine settings of ``generate``) is an
``Option`` below. Its value comes from, lowest to highest precedence:

1. the built-in default (``Option.default``),
2. configuration files (``--config FILE``, repeatable, later files win; or ``NLD_CONFIG``),
   YAML mappings whose keys are the option keys (``max_num_seqs: 64``),
3. environment variables ``NLD_<KEY>`` (``NLD_MAX_NUM_SEQS=64``),
4. command-line flags (``--max-num-seqs 64``).

Each value is checked once, by ``Option.check``, against its type, choices and range;
errors are ``OptionError`` (a ``ValueError``) naming the key and where the value came from.
The argparse parser is generated from the table, so every flag has help text.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

ENV_PREFIX = "NLD_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# NLD_* variables that belong to other tools (the container entrypoint, the health check,
# compose, kernels, tests): never settings, never typos of one
FOREIGN_ENV = frozenset({
    "MODEL_DIR", "EXTRA_ARGS", "PYTHON", "HEALTH_URL", "HEALTH_TIMEOUT", "BASE_IMAGE", "IMAGE", "HOST_PORT",
    "CPU_HOST_PORT", "FORCE_TRITON", "ATTN_AUTOTUNE", "CORPUS_CACHE", "SMOLLM",
    "CPU_GEMV", "CPU_ATTENTION_KERNEL", "CPU_AMX", "CPU_ELEMENTWISE", "KERNEL_CACHE",
})
SERVE, GENERATE = "serve", "generate"
BOTH = (SERVE, GENERATE)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class OptionError(ValueError):
    """An invalid setting; the message names the key and its source."""


def _modes() -> tuple[str, ...]:
    from server.engine.modes import mode_names

    return mode_names()


@dataclass(frozen=True)
class Option:
    """One setting. ``kind`` is int, float, str, bool or list (of str); ``minimum`` and
    ``maximum`` bound numbers (``exclusive_minimum`` makes the lower bound strict);
    ``nullable`` allows None (the default then means "derive it")."""

    key: str
    kind: type
    default: Any
    help: str
    commands: tuple[str, ...] = (SERVE,)
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    nullable: bool = False
    pattern: str | None = None  # strings: a regular expression the whole value must match
    negative_flag: str | None = None  # bool options: the flag that sets False
    secret: bool = False  # redacted when the effective configuration is logged

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    def allowed_choices(self) -> tuple[str, ...] | None:
        return _modes() if self.key == "default_mode" else self.choices

    def check(self, value: Any, source: str) -> Any:
        """``value`` typed and validated (YAML or argparse values; see ``parse_env``)."""
        where = f"{source}: {self.key}"
        if value is None:
            if self.nullable:
                return None
            raise OptionError(f"{where}: a value is required")
        if self.kind is list:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
                raise OptionError(f"{where}: expected a non-empty string or list of strings, got {value!r}")
            return list(items)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is not bool and isinstance(value, bool)):
            raise OptionError(f"{where}: expected {self.kind.__name__}, got {value!r}")
        if self.kind is float and not math.isfinite(value):
            raise OptionError(f"{where}: expected a finite number, got {value!r}")
        choices = self.allowed_choices()
        if choices is not None and value not in choices:
            raise OptionError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise OptionError(f"{where}: must be {self.help.split(' (')[0]}, got {value!r}")
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            raise OptionError(f"{where}: must be {'>' if self.exclusive_minimum else '>='} {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"{where}: must be <= {self.maximum:g}, got {value!r}")
        return value

    def parse_env(self, text: str) -> Any:
        """An environment string as the YAML-typed value ``check`` expects."""
        source = f"environment variable {self.env}"
        text = text.strip()
        if self.kind is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        if self.kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise OptionError(f"{source}: {self.key}: expected true or false, got {text!r}")
        if self.kind in (int, float):
            try:
                return self.kind(text)
            except ValueError:
                raise OptionError(f"{source}: {self.key}: expected {self.kind.__name__}, got {text!r}") from None
        return text


OPTIONS: tuple[Option, ...] = (
    # --- the model and the engine (serve and generate) ---------------------------------
    Option("model", str, None, "local Hugging Face model folder (default: the embedded model)", BOTH, nullable=True),
    Option("device", str, "auto", "auto, cpu, cuda or cuda:N (auto: cuda when available, else cpu)", BOTH,
           pattern=r"auto|cpu|cuda(:[0-9]+)?"),
    Option("dtype", str, "auto", "weights and activations dtype (auto: bfloat16 on cuda, float32 on cpu)", BOTH,
           choices=("auto", "float32", "float16", "bfloat16")),
    Option("max_model_len", int, None, "context length, prompt + output (default: min(checkpoint limit, 8192))",
           BOTH, minimum=2, nullable=True),
    Option("page_size", int, 16, "tokens per KV-cache page", BOTH, minimum=1),
    Option("kv_cache_tokens", int, None,
           "KV-cache pool size in tokens (default: from free GPU memory and --gpu-memory-utilization; "
           "on the CPU 2 x max_model_len or more)", BOTH, minimum=1, nullable=True),
    Option("gpu_memory_utilization", float, 0.85,
           "fraction of GPU memory the process may fill (weights + KV pool) when --kv-cache-tokens is unset",
           BOTH, minimum=0.0, maximum=1.0, exclusive_minimum=True),
    Option("max_num_seqs", int, 64, "most requests in the running batch", BOTH, minimum=1),
    Option("max_num_batched_tokens", int, 2048, "most tokens one engine step processes (chunked prefill)", BOTH,
           minimum=1),
    Option("max_waiting", int, 1024, "most queued requests; more are refused with 503 + Retry-After", BOTH,
           minimum=1),
    Option("enable_prefix_caching", bool, True, "reuse the KV pages of shared prompt prefixes", BOTH,
           negative_flag="--no-prefix-caching"),
    Option("use_cuda_graphs", bool, True, "capture CUDA graphs for decode steps (CUDA only)", BOTH,
           negative_flag="--no-cuda-graphs"),
    Option("default_mode", str, "ar", "decoding mode of requests that name none", BOTH),
    Option("default_refine_steps", int, None, "diffusion refine steps of requests that give none", BOTH,
           minimum=1, nullable=True),
    Option("cpu_threads", int, None, "torch intra-op threads on the CPU (default: all usable cores; fewer on a machine shared with other busy processes)",
           BOTH, minimum=1, nullable=True),
    Option("cpu_compile", bool, False,
           "compile the decoder with torch.compile on the CPU instead of the one-call C path (slower than it "
           "in fp32 for passes of up to 128 rows; 20 s to 2 minutes more at start-up; needs a C++ compiler, "
           "without one the engine runs eagerly)", BOTH),
    # --- the HTTP server (serve) ---------------------------------------------------------
    Option("host", str, "127.0.0.1", "address to bind (0.0.0.0 in a container)"),
    Option("port", int, 8000, "TCP port to bind", minimum=1, maximum=65535),
    Option("api_key", str, None, "require 'Authorization: Bearer KEY' on /v1/* (ops endpoints stay open)",
           nullable=True, secret=True),
    Option("served_model_name", list, None,
           "name(s) a request's model may use; repeat the flag, or a list / comma-separated (default: folder name)",
           nullable=True),
    Option("max_body_bytes", int, 4 * 1024 * 1024, "largest request body accepted (413 beyond)", minimum=1),
    Option("allow_image_urls", bool, False, "fetch http(s) image URLs of image_url parts (off: data: URLs only)"),
    Option("drain_timeout", float, 30.0,
           "seconds SIGTERM waits for in-flight requests before exiting (keep below the orchestrator's grace period)",
           minimum=0.0),
    Option("log_level", str, "info", "log level of the server and uvicorn", choices=LOG_LEVELS),
    Option("replica_id", str, None,
           "this replica's name in logs and the 'replica' metrics label (default: $HOSTNAME, else host-pid)",
           nullable=True),
)
BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}


def options_for(command: str) -> list[Option]:
    return [o for o in OPTIONS if command in o.commands]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add ``--config`` and one flag per option of ``command``. Flags default to
    SUPPRESS, so the namespace holds only what was given on the command line."""
    parser.add_argument("--config", action="append", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"YAML file of settings (repeatable; later files win; flags and {ENV_PREFIX}* "
                             f"variables override it; default ${CONFIG_ENV}, comma-separated)")
    for o in options_for(command):
        choices = o.allowed_choices()
        text = f"{o.help}{' (one of ' + ', '.join(choices) + ')' if choices else ''} [env {o.env}; default {o.default!r}]"
        if o.kind is bool:
            parser.add_argument(o.flag, dest=o.key, action="store_const", const=True, default=argparse.SUPPRESS,
                                help=text)
            if o.negative_flag:
                parser.add_argument(o.negative_flag, dest=o.key, action="store_const", const=False,
                                    default=argparse.SUPPRESS, help=f"the opposite of {o.flag}")
        elif o.kind is list:
            parser.add_argument(o.flag, dest=o.key, action="append", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(o.flag, dest=o.key, type=o.kind, default=argparse.SUPPRESS,
                                metavar=o.key.upper(), help=text)


def read_config_file(path: str | Path, command: str) -> dict[str, Any]:
    """The settings of one YAML file, checked. Keys of another command are accepted and
    dropped (one file can configure serve and generate); unknown keys are errors."""
    import yaml

    source = f"config file {path}"
    path = _locate(Path(path))
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise OptionError(f"{source}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    values = {}
    for key, value in data.items():
        option = BY_KEY.get(str(key))
        if option is None:
            raise OptionError(f"{source}: unknown setting {key!r}{_did_you_mean(str(key))}")
        if command in option.commands:
            values[option.key] = option.check(value, source)
    return values


def _locate(path: Path) -> Path:
    """``path``, or for a relative path missing here, the same path in the source checkout
    (so ``config: configs/x.yaml`` works from a Ray worker whose directory is elsewhere)."""
    if path.is_absolute() or path.exists():
        return path
    checkout = Path(__file__).resolve().parents[1] / path
    return checkout if checkout.exists() else path


def read_environment(env: Mapping[str, str], command: str) -> dict[str, Any]:
    """``NLD_<KEY>`` variables of ``command``'s options, checked. Empty means unset. Other
    ``NLD_*`` names are ignored unless they look like a misspelt setting (an error)."""
    values = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        suffix = name[len(ENV_PREFIX):]
        option = BY_KEY.get(suffix.lower())
        if option is None:
            hint = "" if suffix in FOREIGN_ENV else _did_you_mean(suffix.lower(), env_style=True)
            if hint:
                raise OptionError(f"environment variable {name}: unknown setting{hint}")
            continue
        if command in option.commands and text.strip():
            values[option.key] = option.check(option.parse_env(text), f"environment variable {name}")
    return values


def resolve(
    command: str, flags: Mapping[str, Any], env: Mapping[str, str] | None = None, flags_source: str | None = None
) -> "Settings":
    """Merge defaults < config files < environment < flags for ``command``.
    ``flags`` is the argparse namespace as a dict (SUPPRESS defaults: given flags only), or
    settings given by a host such as Ray Serve (then named ``flags_source`` in errors)."""
    env = os.environ if env is None else env
    values = {o.key: o.default for o in options_for(command)}
    sources = {key: "default" for key in values}
    flags = dict(flags)
    config_files = flags.pop("config", None)
    if isinstance(config_files, str):
        config_files = [config_files]
    if config_files is None and env.get(CONFIG_ENV, "").strip():
        config_files = [p.strip() for p in env[CONFIG_ENV].split(",") if p.strip()]
    for path in config_files or []:
        layer = read_config_file(path, command)
        values.update(layer)
        sources.update(dict.fromkeys(layer, f"config file {path}"))
    layer = read_environment(env, command)
    values.update(layer)
    sources.update({key: f"environment variable {BY_KEY[key].env}" for key in layer})
    for key, value in flags.items():
        option = BY_KEY.get(key)
        if option is None or command not in option.commands:
            raise OptionError(f"{flags_source or 'flags'}: unknown setting {key!r}{_did_you_mean(key)}")
        source = f"flag {option.flag}" if flags_source is None else flags_source
        values[key] = option.check(value, source)
        sources[key] = source
    return Settings(values, sources, tuple(config_files or ()))


@dataclass(frozen=True)
class Settings:
    """The effective settings of one command, with where each value came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    config_files: tuple[str, ...] = ()

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None

    def engine_config(self) -> Any:
        """The ``EngineConfig`` of these settings (its cross-field checks raise OptionError)."""
        from server.config import DEFAULT_MODEL_DIR, EngineConfig

        fields = {k: v for k, v in self.values.items() if k in EngineConfig.__dataclass_fields__}
        fields["model"] = str(fields.get("model") or DEFAULT_MODEL_DIR)
        try:
            return EngineConfig(**fields)
        except ValueError as exc:
            raise OptionError(f"invalid configuration: {exc}") from None

    def describe(self) -> list[str]:
        """One ``key=value (source)`` line per setting, secrets redacted."""
        lines = []
        for key, value in self.values.items():
            shown = "***" if BY_KEY[key].secret and value else value
            lines.append(f"{key}={shown!r} ({self.sources[key]})")
        return lines


def _did_you_mean(key: str, env_style: bool = False) -> str:
    close = difflib.get_close_matches(key, list(BY_KEY), n=1, cutoff=0.85 if env_style else 0.6)
    if not close:
        return ""
    return f"; did you mean {ENV_PREFIX + close[0].upper() if env_style else close[0]!r}?"

