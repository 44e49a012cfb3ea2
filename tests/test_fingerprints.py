"""Content fingerprints (issue 32, item 8): every byte of a file counts, files over 64 MiB too,
and the hash cache that spares re-reading big files never serves a changed file's hash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hydrabench.records import provenance
from hydrabench.records.provenance import digest_cache_path, file_digest, fingerprint_path

BIG = 65 * 2**20  # over the 64 MiB that used to be hashed by size and first/last MiB only


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache root and an in-process digest table of this test's own."""
    monkeypatch.setenv("HYDRABENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(provenance, "_FILE_DIGESTS", {})


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files hashed whole, in order (the real hash, counted)."""
    hashed: list[Path] = []
    real = provenance._sha256_file

    def sha256_file(file: Path) -> str:
        hashed.append(file)
        return real(file)

    monkeypatch.setattr(provenance, "_sha256_file", sha256_file)
    return hashed


def sparse_file(path: Path, size: int, marks: dict[int, bytes]) -> Path:
    """A file of `size` bytes, zero (sparse: quick to write) but for `marks` at their offsets."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, data in marks.items():
            fh.seek(offset)
            fh.write(data)
    return path


def settle(path: Path) -> None:
    """Pretend `path` was last written an hour ago: hashes of just-written files are not kept
    (a same-size write within the same clock tick would keep every stat field). ctime cannot
    be set back, so the racy window is what is shortened instead (see `settled`)."""
    old = path.stat().st_mtime_ns - 3600 * 10**9
    os.utime(path, ns=(old, old))


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashes of files written by this test count as settled (their ctime is now)."""
    monkeypatch.setattr(provenance, "_RACY_NS", -1)


def test_same_size_edit_in_the_middle_of_a_big_file_changes_its_fingerprint(tmp_path: Path):
    corpus = sparse_file(tmp_path / "corpus.jsonl", BIG, {BIG // 2: b"before"})
    before = fingerprint_path(corpus)
    sparse_file(corpus, BIG, {BIG // 2: b"after!"})  # same size, first and last MiB unchanged
    assert corpus.stat().st_size == BIG
    after = fingerprint_path(corpus)
    assert after != before
    sparse_file(corpus, BIG, {BIG // 2: b"before"})
    assert fingerprint_path(corpus) == before  # content, not history


def test_big_file_digest_is_the_sha256_of_every_byte(tmp_path: Path):
    import hashlib

    data = sparse_file(tmp_path / "model.safetensors", BIG, {0: b"head", BIG // 3: b"x"})
    assert file_digest(data) == hashlib.sha256(data.read_bytes()).hexdigest()


def test_unchanged_big_file_is_read_from_the_cache_in_a_new_process(
        tmp_path: Path, counted: list[Path], settled: None, monkeypatch: pytest.MonkeyPatch):
    shard = sparse_file(tmp_path / "model.safetensors", BIG, {BIG // 2: b"w"})
    settle(shard)
    first = file_digest(shard)
    assert counted == [shard]
    entry = json.loads(digest_cache_path().read_text())[str(shard)]
    assert entry["sha256"] == first
    monkeypatch.setattr(provenance, "_FILE_DIGESTS", {})  # as a new process starts
    assert file_digest(shard) == first
    assert counted == [shard]  # not hashed again


def test_changed_stat_rehashes_the_whole_file(tmp_path: Path, counted: list[Path],
                                              settled: None, monkeypatch: pytest.MonkeyPatch):
    shard = sparse_file(tmp_path / "model.safetensors", BIG, {BIG // 2: b"w"})
    settle(shard)
    first = file_digest(shard)
    # Re-saved in place with the same size, its mtime set back to the old one: ctime still moves.
    mtime = shard.stat().st_mtime_ns
    sparse_file(shard, BIG, {BIG // 2: b"v"})
    os.utime(shard, ns=(mtime, mtime))
    monkeypatch.setattr(provenance, "_FILE_DIGESTS", {})
    second = file_digest(shard)
    assert second != first
    assert counted == [shard, shard]
    # Replaced by another file (new inode) with the same size and times.
    replacement = sparse_file(tmp_path / "other", BIG, {BIG // 2: b"w"})
    stat = shard.stat()
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, shard)
    monkeypatch.setattr(provenance, "_FILE_DIGESTS", {})
    assert file_digest(shard) == first
    assert len(counted) == 3


def test_just_written_big_file_is_not_kept(tmp_path: Path, counted: list[Path]):
    """A file changed within the last clock ticks could change again without its stat showing
    it: its hash is used, not kept, and the next call hashes it again."""
    shard = sparse_file(tmp_path / "model.safetensors", BIG, {1: b"w"})
    file_digest(shard)
    file_digest(shard)
    assert counted == [shard, shard]
    assert not digest_cache_path().exists()


@pytest.mark.parametrize("corrupt", ["{not json", "[1, 2]", '{"x": 5}', ""])
def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path: Path, counted: list[Path],
                                                     settled: None, corrupt: str):
    shard = sparse_file(tmp_path / "model.safetensors", BIG, {7: b"w"})
    settle(shard)
    digest_cache_path().parent.mkdir(parents=True)
    digest_cache_path().write_text(corrupt)
    digest = file_digest(shard)
    assert counted == [shard]
    kept = json.loads(digest_cache_path().read_text())
    assert kept == {str(shard): {"stat": provenance._stat_key(shard.stat()), "sha256": digest}}


def test_a_poisoned_cache_entry_for_other_stat_is_not_served(tmp_path: Path, counted: list[Path],
                                                            settled: None):
    shard = sparse_file(tmp_path / "model.safetensors", BIG, {7: b"w"})
    settle(shard)
    stale = provenance._stat_key(shard.stat())
    stale[1] += 1  # another mtime: an entry for an earlier version of the file
    digest_cache_path().parent.mkdir(parents=True)
    digest_cache_path().write_text(json.dumps({str(shard): {"stat": stale, "sha256": "0" * 64}}))
    assert file_digest(shard) != "0" * 64
    assert counted == [shard]


def test_small_file_fingerprints_are_unchanged(tmp_path: Path):
    """Run ids of every shipped table hash files under 64 MiB: their fingerprints are the ones
    computed before big files were hashed whole (values from that code)."""
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hydrabench small file\n")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4096)
    assert file_digest(root / "a.txt") == (
        "c1aa14155caaea02a4dc63eda53796db5164eae6ec2a658733db56a9afe39aff")
    assert file_digest(root / "sub" / "b.bin") == (
        "fbbab289f7f94b25736c58be46a994c441fd02552cc6022352e3d86d2fab7c83")
    assert fingerprint_path(root) == (
        "00f9d89f6e7c8918846d24fb94b385575652e2ba3ff92c86210166381a7beab5")
    assert not digest_cache_path().exists()  # small files are not kept on disk
