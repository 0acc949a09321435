"""Fixtures of the ops tests: the fake OpenAI server of fake_openai_server.py on a loopback port."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

if str(Path(__file__).parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))

from fake_openai_server import ServerThread, make_app  # noqa: E402


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ServerThread]:
    with ServerThread(make_app(usage_extension=True)) as s:
        yield s


@pytest.fixture(scope="module")
def fake_server_no_ext() -> Iterator[ServerThread]:
    with ServerThread(make_app(usage_extension=False)) as s:
        yield s
