"""Settings layering (defaults < config files < NLD_* environment < flags), validation
with errors naming the key and its source, help text on every flag, and the presets."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from server.config import EngineConfig
from server.options import BY_KEY, GENERATE, OPTIONS, SERVE, OptionError, add_arguments, resolve

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
GPU_PRESETS = sorted(CONFIGS.glob("nld-*-gpu.yaml"))
OVERLAYS = [CONFIGS / "latency.yaml", CONFIGS / "throughput.yaml"]


def parse(argv: list[str], command: str = SERVE) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser, command)
    return vars(parser.parse_args(argv))


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_layers_in_order(tmp_path: Path) -> None:
    low = write(tmp_path, "low.yaml", "max_num_seqs: 3\nmax_waiting: 7\nport: 9001\npage_size: 32\n")
    high = write(tmp_path, "high.yaml", "max_waiting: 8\nport: 9002\n")
    env = {"NLD_PORT": "9003", "NLD_DRAIN_TIMEOUT": "12.5", "NLD_PAGE_SIZE": ""}  # empty = unset
    s = resolve(SERVE, parse(["--config", low, "--config", high, "--drain-timeout", "40"]), env)
    assert s.max_num_seqs == 3 and s.sources["max_num_seqs"] == f"config file {low}"
    assert s.max_waiting == 8 and s.sources["max_waiting"] == f"config file {high}"  # later file wins
    assert s.page_size == 32
    assert s.port == 9003 and s.sources["port"] == "environment variable NLD_PORT"  # env beats files
    assert s.drain_timeout == 40.0 and s.sources["drain_timeout"] == "flag --drain-timeout"  # flags beat env
    assert s.max_num_batched_tokens == 2048 and s.sources["max_num_batched_tokens"] == "default"
    config = s.engine_config()
    assert isinstance(config, EngineConfig) and config.max_num_seqs == 3 and config.page_size == 32


def test_config_file_from_environment_and_flag_replaces_it(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "max_num_seqs: 5\n")
    b = write(tmp_path, "b.yaml", "max_num_seqs: 6\n")
    assert resolve(SERVE, parse([]), {"NLD_CONFIG": a}).max_num_seqs == 5
    assert resolve(SERVE, parse(["--config", b]), {"NLD_CONFIG": a}).max_num_seqs == 6


def test_types_from_every_source(tmp_path: Path) -> None:
    env = {"NLD_ENABLE_PREFIX_CACHING": "false", "NLD_SERVED_MODEL_NAME": "a, b", "NLD_GPU_MEMORY_UTILIZATION": "0.5",
           "NLD_MAX_MODEL_LEN": "1024", "NLD_API_KEY": "k"}
    s = resolve(SERVE, parse([]), env)
    assert s.enable_prefix_caching is False and s.served_model_name == ["a", "b"]
    assert s.gpu_memory_utilization == 0.5 and s.max_model_len == 1024
    assert "api_key='***' (environment variable NLD_API_KEY)" in s.describe()
    s = resolve(SERVE, parse(["--enable-prefix-caching", "--served-model-name", "x y", "--served-model-name", "z"]), env)
    assert s.enable_prefix_caching is True and s.served_model_name == ["x y", "z"]
    assert resolve(SERVE, parse(["--no-prefix-caching"]), {}).engine_config().enable_prefix_caching is False
    f = write(tmp_path, "f.yaml", "served_model_name: solo\nkv_cache_tokens: null\ngpu_memory_utilization: 1\n")
    s = resolve(SERVE, parse(["--config", f]), {})
    assert s.served_model_name == ["solo"] and s.kv_cache_tokens is None and s.gpu_memory_utilization == 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_num_seq: 3\n", "unknown setting 'max_num_seq'; did you mean 'max_num_seqs'?"),
        ("max_num_seqs: 0\n", "max_num_seqs: must be >= 1, got 0"),
        ("max_num_seqs: '8'\n", "max_num_seqs: expected int, got '8'"),
        ("max_num_seqs: 2.5\n", "max_num_seqs: expected int, got 2.5"),
        ("enable_prefix_caching: 1\n", "enable_prefix_caching: expected bool, got 1"),
        ("port: true\n", "port: expected int, got True"),
        ("port: 70000\n", "port: must be <= 65535, got 70000"),
        ("gpu_memory_utilization: 0\n", "gpu_memory_utilization: must be > 0, got 0.0"),
        ("dtype: fp8\n", "dtype: must be one of auto, float32, float16, bfloat16, got 'fp8'"),
        ("default_mode: fast\n", "default_mode: must be one of ar, diffusion, self_spec, auto, got 'fast'"),
        ("device: tpu\n", "device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("log_level: loud\n", "log_level: must be one of"),
        ("served_model_name: []\n", "served_model_name: expected a non-empty string or list"),
        ("port: null\n", "port: a value is required"),
        ("- port\n", "expected a mapping of settings, got list"),
        ("port: [\n", "not valid YAML"),
    ],
)
def test_config_file_errors_name_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(OptionError) as err:
        resolve(SERVE, parse(["--config", path]), {})
    assert str(err.value).startswith(f"config file {path}: ") and message in str(err.value), str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="config file .*nope.yaml: cannot read it"):
        resolve(SERVE, parse(["--config", str(tmp_path / "nope.yaml")]), {})


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NLD_MAX_NUM_SEQS": "many"}, "environment variable NLD_MAX_NUM_SEQS: max_num_seqs: expected int, got 'many'"),
        ({"NLD_ENABLE_PREFIX_CACHING": "maybe"}, "NLD_ENABLE_PREFIX_CACHING: enable_prefix_caching: expected true or false"),
        ({"NLD_PORT": "tcp://10.0.0.1:8000"}, "NLD_PORT: port: expected int"),  # a Kubernetes service link
        ({"NLD_MAX_NUM_SEQ": "4"}, "environment variable NLD_MAX_NUM_SEQ: unknown setting; did you mean 'NLD_MAX_NUM_SEQS'?"),
        ({"NLD_DRAIN_TIMEOUT": "-1"}, "NLD_DRAIN_TIMEOUT: drain_timeout: must be >= 0"),
        ({"NLD_DRAIN_TIMEOUT": "nan"}, "NLD_DRAIN_TIMEOUT: drain_timeout: expected a finite number"),
    ],
)
def test_environment_errors_name_the_variable(env: dict, message: str) -> None:
    with pytest.raises(OptionError) as err:
        resolve(SERVE, parse([]), env)
    assert message in str(err.value), str(err.value)


def test_foreign_nld_variables_are_ignored() -> None:
    env = {"NLD_MODEL_DIR": "/models", "NLD_EXTRA_ARGS": "--x", "NLD_FORCE_TRITON": "1", "NLD_HOST_PORT": "8001",
           "NLD_SOMETHING_ELSE": "1", "NLD_CPU_GEMV": "0", "NLD_CPU_ATTENTION_KERNEL": "0", "NLD_CPU_AMX": "0", "NLD_CPU_ELEMENTWISE": "0",
           "NLD_KERNEL_CACHE": "/tmp/k"}
    assert resolve(SERVE, parse([]), env).sources["host"] == "default"


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(OptionError, match="flag --max-num-seqs: max_num_seqs: must be >= 1, got 0"):
        resolve(SERVE, parse(["--max-num-seqs", "0"]), {})
    with pytest.raises(OptionError, match="invalid configuration: kv_cache_tokens must hold at least one page"):
        resolve(SERVE, parse(["--kv-cache-tokens", "4"]), {}).engine_config()


def test_generate_ignores_server_keys_of_a_shared_file(tmp_path: Path) -> None:
    path = write(tmp_path, "both.yaml", "port: 9000\nmax_num_seqs: 2\n")
    s = resolve(GENERATE, parse(["--config", path], GENERATE), {"NLD_HOST": "0.0.0.0"})
    assert s.max_num_seqs == 2 and "port" not in s.values and "host" not in s.values


@pytest.mark.parametrize("command", [SERVE, GENERATE])
def test_every_flag_has_help(command: str) -> None:
    from server.__main__ import generate_parser, serve_parser

    parser = serve_parser() if command == SERVE else generate_parser()
    actions = [a for a in parser._actions if a.option_strings]
    assert len(actions) > 10
    for action in actions:
        assert action.help and action.help.strip(), action.option_strings
    flags = {s for a in actions for s in a.option_strings}
    assert {o.flag for o in OPTIONS if command in o.commands} <= flags


def test_every_bench_flag_has_help() -> None:
    from server.bench.cli import build_parser

    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 10 and all(a.help and a.help.strip() for a in actions), [
        a.option_strings for a in actions if not a.help]


def test_option_table_is_consistent_with_engine_config() -> None:
    fields = EngineConfig.__dataclass_fields__
    for name, field in fields.items():
        if name in BY_KEY:  # the same default in both places
            assert BY_KEY[name].default == (None if name == "model" else field.default), name
    assert {k for k in BY_KEY if GENERATE in BY_KEY[k].commands} <= set(fields) | {"model"}


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads_and_validates(preset: Path) -> None:
    s = resolve(SERVE, parse(["--config", str(preset)]), {})
    keys = set(yaml.safe_load(preset.read_text()))
    assert keys and all(s.sources[k] == f"config file {preset}" for k in keys)
    s.engine_config()
    resolve(GENERATE, parse(["--config", str(preset)], GENERATE), {}).engine_config()


def _sizing():  # configs/sizing.py is a script, not a package
    if "nld_sizing" not in sys.modules:
        spec = importlib.util.spec_from_file_location("nld_sizing", CONFIGS / "sizing.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["nld_sizing"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["nld_sizing"]


@pytest.mark.parametrize("preset", GPU_PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: p.name if p else "alone")
def test_gpu_preset_fits_an_80gb_gpu(preset: Path, overlay: Path | None) -> None:
    """Weights + workspace + KV pool within 90% of 80 GiB for the preset alone and with
    each overlay, and the pool is no smaller than 90% of what fits (not wasteful)."""
    sizing = _sizing()
    files = ["--config", str(preset)] + (["--config", str(overlay)] if overlay else [])
    config = resolve(SERVE, parse(files), {}).engine_config()
    size = preset.name.split("-")[1]
    shapes = sizing.MODELS[size]
    gpu = sizing.GPUS["H100 80GB"]
    assert config.model.endswith(f"-{size.upper()}") and config.device == "cuda" and config.dtype == "bfloat16"
    total = shapes.total_bytes(config.kv_cache_tokens, config.max_num_batched_tokens)
    assert total <= gpu * sizing.UTILIZATION, (total / 2**30, preset.name)
    assert config.kv_cache_tokens >= 0.9 * shapes.kv_pool_tokens(gpu)
    assert config.kv_cache_tokens % config.page_size == 0
    assert config.kv_cache_tokens >= 4 * config.max_model_len  # several full-length sequences fit
    assert config.max_num_batched_tokens <= sizing.WORKSPACE_BATCHED_TOKENS


def test_sizing_matches_the_documented_3b_parameter_count() -> None:
    # the 3B checkpoint has 3.83 B parameters (nemotron-labs-diffusion.md, 1.1)
    assert round(_sizing().MODELS["3b"].params / 1e9, 2) == 3.83
