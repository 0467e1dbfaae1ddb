"""Shared pytest fixtures (loaded by conftest.py via pytest_plugins): ``fake_vast``."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.fakevast import FakeVast


@pytest.fixture
def fake_vast(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeVast]:
    """A running FakeVast; ``VAST_URL`` and ``VAST_API_KEY`` point at it for the test."""
    with FakeVast() as fake:
        monkeypatch.setenv("VAST_URL", fake.url)
        monkeypatch.setenv("VAST_API_KEY", fake.api_key)
        yield fake
