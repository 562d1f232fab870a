"""Test set-up: the tiny-model fixtures live next to the tests; everything runs offline on the CPU."""

import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: cards, metrics and loaders must work without the Hub."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
