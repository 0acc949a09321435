"""Load generator for OpenAI-compatible servers (ours, vLLM, SGLang).

``main(argv) -> int`` is the entry point of ``python -m server.bench`` and
``python -m server bench``.
"""

from server.bench.cli import main

__all__ = ["main"]
