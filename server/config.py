"""Engine configuration: one frozen dataclass, validated on construction (ValueError)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.engine.modes import get_mode
from server.engine.params import check_knob

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


@dataclass(frozen=True)
class EngineConfig:
    model: str = str(DEFAULT_MODEL_DIR)
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 on cpu
    page_size: int = 16
    kv_cache_tokens: int | None = None  # pool size in tokens; None = derived from device memory
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # None = min(checkpoint limit, 8192)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    enable_prefix_caching: bool = True
    default_mode: str = "ar"
    default_refine_steps: int | None = None
    use_cuda_graphs: bool = True
    cpu_threads: int | None = None  # torch intra-op threads on the CPU; None = all usable cores
    cpu_compile: bool = False  # torch.compile the decoder on the CPU (server.engine.cpu_compile)

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise ValueError("kv_cache_tokens must hold at least one page")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_waiting < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_waiting must be >= 1")
        get_mode(self.default_mode)
        if self.default_refine_steps is not None:
            check_knob("refine_steps", self.default_refine_steps)
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"unknown device {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
