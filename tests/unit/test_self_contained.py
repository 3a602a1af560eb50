"""The repository runs and tests on its own: nothing in it reads the build machines' `../shared`.

A user's clone, a fork's CI or a release tarball has no folder beside the repo; the real Criteo
extracts the tests need live in `tests/data/` with their sources.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import CSV_SAMPLE, RAW_SAMPLE, REPO

# `../shared`, `..\shared`, or a path built as parent / "shared" (the way the old conftest did it)
SHARED_REF = re.compile(r"\.\.[/\\]shared\b|parents?\b[^\n]{0,40}[\"']shared[\"']")
SCANNED = ["plugins", "dags", "jobs", "tests", "benchmarks"]
TEXT_SUFFIXES = {".py", ".sh", ".cfg", ".toml", ".ini", ".yaml", ".yml", ".json", ".j2", ".txt", ".xml", ".md", ""}


def _scanned_files() -> list[Path]:
    files = [REPO / "Makefile", REPO / ".ci" / "run"]
    for top in SCANNED:
        for p in (REPO / top).rglob("*"):
            if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts and "results" not in p.parts:
                files.append(p)
    return files


def test_no_file_refers_to_shared_folder() -> None:
    me = Path(__file__).resolve()
    hits = []
    for p in _scanned_files():
        if p.resolve() == me:
            continue
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if SHARED_REF.search(line):
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, "the project must not read ../shared (copy what it needs into the repo):\n" + "\n".join(hits)


def test_pattern_catches_the_ways_it_was_written() -> None:
    for bad in ['open("../shared/data/x.tsv")', 'REPO.parent / "shared" / "data"', "cat ..\\shared\\x"]:
        assert SHARED_REF.search(bad), bad
    for ok in ['"shared_access_key"', "a shared session bundle", "tests/data/criteo_raw_sample_100.tsv"]:
        assert not SHARED_REF.search(ok), ok


def test_real_samples_are_in_the_repo() -> None:
    for p in (RAW_SAMPLE, CSV_SAMPLE):
        assert p.is_file() and p.resolve().is_relative_to(REPO), p
    assert len(RAW_SAMPLE.read_text().splitlines()) == 100
    assert len(CSV_SAMPLE.read_text().splitlines()) == 201  # header + 200 rows
