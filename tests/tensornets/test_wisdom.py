"""The wisdom file under concurrent processes, and the cache directory it shares with the packaged models."""

from __future__ import annotations

import json

import pytest

from tensornets import wisdom
from tensornets.cache_dir import cache_root
from tensornets.models import default_cache_dir


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A private cache directory; the wisdom file is read afresh by this test."""
    monkeypatch.setenv("TENSORNETS_CACHE", str(tmp_path / "cache"))
    wisdom.forget()
    yield tmp_path / "cache"
    wisdom.forget()


def test_record_keeps_entries_another_process_wrote_since(cache):
    wisdom.record("a", "rebuild", {"rebuild": 1.0})
    # Another process records "b" after this one read the file (done here as that process would: its own read).
    data = json.loads((cache / "wisdom.json").read_text())
    data["machines"][wisdom.machine_key()]["b"] = {"plan": "split@2", "seconds": {"split@2": 1.0}}
    (cache / "wisdom.json").write_text(json.dumps(data))
    wisdom.record("c", "rebuild", {"rebuild": 3.0})
    stored = json.loads((cache / "wisdom.json").read_text())["machines"][wisdom.machine_key()]
    assert sorted(stored) == ["a", "b", "c"]
    assert stored["b"]["plan"] == "split@2"
    assert [p.name for p in cache.iterdir()] == ["wisdom.json"]  # no lock or temporary file left behind


def test_one_cache_directory_for_wisdom_and_models(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORNETS_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert wisdom.wisdom_path() == tmp_path / "wisdom.json"
    assert default_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("TENSORNETS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert wisdom.wisdom_path() == tmp_path / "xdg" / "tensornets" / "wisdom.json"
    assert default_cache_dir() == tmp_path / "xdg" / "tensornets" / "smollm2-135m"


def test_wisdom_file_gets_the_umask_mode_not_mkstemps_0600(cache):
    # a cache directory shared by several users: the file must be as readable as any file they create
    import os

    old = os.umask(0o022)
    try:
        wisdom.record("a", "rebuild", {"rebuild": 1.0})
    finally:
        os.umask(old)
    assert (cache / "wisdom.json").stat().st_mode & 0o777 == 0o644
