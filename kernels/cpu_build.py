"""Build and load the project's C kernels for the CPU (``kernels/*.c``) at run time.

A source is compiled on first use with the machine's C compiler (``$CC``, else ``cc`` or
``gcc``; ``-O3 -march=native -ffp-contract=off -fopenmp``: products and sums rounded as
written) into ``~/.cache/nld-server/kernels``
(``$NLD_KERNEL_CACHE`` overrides), named by a hash of the source, the compiler, the flags and
this CPU's feature flags, and loaded with ctypes (which releases the GIL during calls). The
OpenMP runtime is torch's own (same soname, loaded first), so the kernels share its threads.
Without a compiler, or when the build fails, ``load`` returns None and callers keep their
PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def cache_dir() -> Path:
    return Path(os.environ.get("NLD_KERNEL_CACHE", Path.home() / ".cache" / "nld-server" / "kernels"))


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build(source: Path, cc: str, flags: list[str] = FLAGS) -> Path:
    """The shared library built from ``source`` with ``flags``, from the cache when present.
    The cache key covers the headers next to the source (``#include "cpu_bf16.h"``) too."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(text + " ".join([cc, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([cc, *flags, str(source), "-o", str(built), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


def load(source: Path, switch: str) -> ctypes.CDLL | None:
    """``source`` built (or found in the cache) and loaded; None where it cannot be or where
    the environment variable ``switch`` is ``0``."""
    if os.environ.get(switch, "1") == "0":
        return None
    cc = compiler()
    if cc is None:
        log.info("no C compiler: %s is not used, the PyTorch path runs instead", source.name)
        return None
    try:
        return ctypes.CDLL(str(build(source, cc)))
    except (OSError, subprocess.SubprocessError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        log.warning("building %s failed (%s); the PyTorch path runs instead. %s", source.name, exc,
                    stderr.decode(errors="replace")[-500:])
        return None
