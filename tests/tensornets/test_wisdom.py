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


def test_a_cache_directory_this_user_cannot_search_costs_a_warning_not_the_forward(cache, monkeypatch):
    # docker --user with HOME=/root, or TENSORNETS_CACHE in another user's 0700 directory: Path.exists raises
    # PermissionError there (the test runs as any user, root included, so the refusal is simulated)
    from pathlib import Path

    exists = Path.exists

    def refuse(path, *args, **kwargs):
        if cache in Path(path).parents or Path(path) == cache:
            raise PermissionError(13, "Permission denied", str(path))
        return exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", refuse)
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: refuse(cache / "x"))
    with pytest.warns(RuntimeWarning, match="is unreadable .*Permission denied"):
        assert wisdom.lookup("a") is None
    with pytest.warns(RuntimeWarning, match="cannot write its wisdom file .*Permission denied"):
        wisdom.record("a", "rebuild", {"rebuild": 1.0})
    assert wisdom.lookup("a")["plan"] == "rebuild"  # remembered by this process


def test_a_hostile_wisdom_file_nested_thousands_deep_is_ignored_with_a_warning(cache):
    cache.mkdir(parents=True)
    (cache / "wisdom.json").write_text("[" * 100_000)
    with pytest.warns(RuntimeWarning, match="is unreadable"):
        assert wisdom.lookup("a") is None
    wisdom.record("a", "rebuild", {"rebuild": 1.0})  # and rewritten
    assert json.loads((cache / "wisdom.json").read_text())["machines"][wisdom.machine_key()]["a"]["plan"] == "rebuild"


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(cache):
    cache.mkdir(parents=True)
    (cache / ".wisdom-k1ll3d.json").write_text('{"version": 1')  # a writer killed before its rename
    wisdom.record("a", "rebuild", {"rebuild": 1.0})
    assert [p.name for p in cache.iterdir()] == ["wisdom.json"]
