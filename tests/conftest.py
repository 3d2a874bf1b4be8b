"""Shared fixtures. Every test runs real Caffe (built by `make install`); nothing is mocked."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def toy_layers_on_path(monkeypatch):
    """Let `caffe train` (a subprocess) import tests/toy_layers.py."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
