"""Every benchmark script and training command prints its ``--help`` (argparse formats each
help text with ``%``, so a bare ``%`` in one crashes the whole command before it parses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "__init__.py")
MODULES = ["training.corpus", "training.distill", "training.draft_lora", "training.evaluate",
           "training.tokenizer", "training.train", "server"]

# One interpreter runs them all, so torch is imported once.
RUNNER = """
import contextlib, io, runpy, sys
failed = []
for kind, target in [tuple(a.split('=', 1)) for a in sys.argv[1:]]:
    sys.argv = [target, '--help']
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if kind == 'path':
                runpy.run_path(target, run_name='__main__')
            else:
                runpy.run_module(target, run_name='__main__', alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:
        code = repr(e)
    if code != 0 or 'usage:' not in out.getvalue():
        failed.append((target, code))
print(failed)
"""


def test_every_command_prints_its_help() -> None:
    targets = [f"path={p}" for p in SCRIPTS] + [f"module={m}" for m in MODULES]
    assert len(SCRIPTS) >= 10
    done = subprocess.run([sys.executable, "-c", RUNNER, *targets], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
