"""The demo's printed examples use values the served model was trained on, and survive a bundle without them."""

from __future__ import annotations

import json
from pathlib import Path

from ctr.demo import ITEM_COLUMN, RANK_EXAMPLE, example_request


def _bundle(tmp_path: Path, vocab: dict) -> Path:
    (tmp_path / "features.json").write_text(json.dumps({"vocab": vocab}))
    return tmp_path


def test_the_example_takes_the_most_frequent_values_of_the_bundle(tmp_path: Path) -> None:
    b = _bundle(tmp_path, {"C1": ["0000000a", "0000000b"], ITEM_COLUMN: ["000000c1", "000000c2", "000000c3", "000000c4"]})
    ex = example_request(b)
    assert ex["context"]["C1"] == "0000000a"
    assert [c[ITEM_COLUMN] for c in ex["candidates"]] == ["000000c1", "000000c2", "000000c3"]
    assert [c["id"] for c in ex["candidates"]] == ["item-1", "item-2", "item-3"] and ex["k"] == 2


def test_without_a_usable_vocabulary_the_fixed_example_is_printed(tmp_path: Path) -> None:
    assert example_request(None) is RANK_EXAMPLE
    assert example_request(tmp_path) is RANK_EXAMPLE                                  # no features.json
    assert example_request(_bundle(tmp_path, {"C1": ["0000000a"], ITEM_COLUMN: ["000000c1"]})) is RANK_EXAMPLE
    (tmp_path / "features.json").write_text("{not json")
    assert example_request(tmp_path) is RANK_EXAMPLE


def test_the_demo_traffic_is_spread_over_the_whole_day() -> None:
    """The demo scores rows from across the day, not its first ones (whose skew `ctr monitor` called drift)."""
    import pyarrow as pa
    from ctr.demo import spread_rows

    day = pa.table({"I1": list(range(10_000))})
    rows = spread_rows(day, 300)
    got = [r["I1"] for r in rows]
    assert len(got) == 300 and got == sorted(set(got))
    assert got[0] == 0 and got[-1] == 9_999 and max(b - a for a, b in zip(got, got[1:], strict=False)) <= 34
    assert spread_rows(day, 300) == rows                                # the same rows every run
    assert [r["I1"] for r in spread_rows(pa.table({"I1": [5, 6]}), 300)] == [5, 6]
    assert spread_rows(pa.table({"I1": pa.array([], pa.int64())}), 300) == []
