"""Tiny end-to-end runs on the embedded digits data: a teacher shared by the strategy tests."""
from __future__ import annotations

import pytest

from reuse_core import run as reuse_run
from reuse_core.store import ModelStore


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Default run directories (./runs/...) land in the test's folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def teacher(store, tmp_path_factory):
    """small-cnn on digits 0-4, one short epoch."""
    return reuse_run.run("pretrain", store=store, run_dir=tmp_path_factory.mktemp("teacher"), quiet=True,
                         backbone="small-cnn", classes=["0-4"], epochs=1, label_budget=30, lr=0.1)
