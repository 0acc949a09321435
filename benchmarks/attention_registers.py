"""Registers and spills of the paged attention kernels compiled for a GPU, on a machine without one.

    python benchmarks/attention_registers.py [--arch 90] [--no-specialize] [--only NAME...]

Triton compiles each kernel ahead of time for the target (``GPUTarget("cuda", arch, 32)``),
and the ``ptxas`` bundled with Triton reports registers per thread and spill bytes
(``ptxas -v``). By default the compile sees the argument specialisation a real launch gets
(pointers and strides divisible by 16, as the engine's bf16 tensors with head_dim 128 are);
``--no-specialize`` drops it (what an unspecialised compile spills is not what runs). The
configs are the tuner's picks on an H200 (docs/gpu-results.md). Needs no GPU, only Triton's
NVIDIA backend files (present in the Linux wheels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class KernelConfig:
    name: str
    kernel: str  # "main" or "split"
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group: int = 4
    head_dim: int = 128


# the tuned picks of docs/gpu-results.md (8B shapes: GQA group 4, head_dim 128, bf16)
CONFIGS = (
    KernelConfig("decode", "main", 16, 64, 8, 3),
    KernelConfig("block_32", "main", 64, 128, 8, 2),
    KernelConfig("prefill", "main", 64, 64, 4, 3),
    KernelConfig("default_decode", "main", 16, 64, 4, 3),
    KernelConfig("split_decode", "split", 16, 64, 8, 1),
)

_INT_POINTERS = {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
                 "causal_ptr": "*u8", "sub_block_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
# runtime ints that a launch with the engine's tensors passes as multiples of 16
_DIVISIBLE = re.compile(r"^(stride_(o|q|k|v|kc|vc|p)[a-z]*|page_size)$")


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_kernel(cfg: KernelConfig, arch: int = 90, specialize: bool = True) -> dict:
    """Compile one config to PTX and assemble it with ``ptxas -v``: registers, spill bytes.
    Needs a process where Triton was imported without ``TRITON_INTERPRET=1`` (under the
    interpreter, ``@triton.jit`` functions cannot be compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.block_attention as ba

    fn = ba._paged_attention_kernel if cfg.kernel == "main" else ba._paged_attention_split_kernel
    names = fn.arg_names
    const = {"HEAD_DIM": cfg.head_dim, "GROUP": cfg.group, "BLOCK_Q": cfg.block_m // cfg.group, "BLOCK_M": cfg.block_m,
             "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.head_dim, "UPCAST": False, "DOT_PRECISION": None, "QUADRATIC": False}
    signature, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            signature[n] = "constexpr"
            continue
        if n.endswith("_ptr"):
            signature[n] = _INT_POINTERS.get(n, "*bf16")
        else:
            signature[n] = "fp32" if n == "qk_scale" else "i32"
        if specialize and (n.endswith("_ptr") or _DIVISIBLE.match(n)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        arch_flag = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas_path(), "-v", f"-arch={arch_flag}", str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {cfg.name}: {proc.stderr[-500:]}")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert regs is not None and spills is not None, proc.stderr
    return {"config": cfg.name, "kernel": cfg.kernel, "tile": f"M{cfg.block_m}/N{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}",
            "registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    p.add_argument("--no-specialize", action="store_true", help="compile without the launch's divisibility hints")
    p.add_argument("--only", nargs="+", help="config names (default: all)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules:
        del os.environ["TRITON_INTERPRET"]  # compile for real
    rows = [compile_kernel(c, args.arch, not args.no_specialize) for c in CONFIGS if not args.only or c.name in args.only]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"| config | kernel | tile | registers | spill stores B | spill loads B |  (sm_{args.arch}, "
          f"{'unspecialised' if args.no_specialize else 'launch specialisation'})")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['kernel']} | {r['tile']} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
