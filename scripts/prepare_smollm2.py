#!/usr/bin/env python3
"""Build the SmolLM2-135M-Instruct test model folder once (CI runs this before the tests).

Usage: python scripts/prepare_smollm2.py   # prints the folder; honours $NLD_SMOLLM2_DIR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.smollm2 import cache_dir, is_built, smollm2_dir  # noqa: E402


def main() -> int:
    start = time.monotonic()
    already = is_built(cache_dir())
    path = smollm2_dir()
    note = "already built" if already else f"ready after {time.monotonic() - start:.0f} s (built here or by a concurrent process)"
    print(f"{path} ({note})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
