"""Random raw Criteo lines and vocabularies for the encoder tests (one generator, shared by the suites)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from ctr.features.transform import FeatureTransform
from ctr.schema import CAT_COLUMNS, INT_COLUMNS

# Spellings an encoder must refuse or read exactly as the reader does.
ODD_INTS = ["-0", "007", "-007", "0", "-", "--1", "1-2", "+5", " 5", "5 ", "1.0", "1e5", "a", "\x00", "\u00e9",
            "9" * 15, "-" + "9" * 15, "9" * 16, str(2**53), str(-(2**53)), str(2**53 + 1), "9" * 19, "12345678",
            "123456789"]
ODD_CATS = ["abcdef1", "abcdef123", "ABCDEFGH", "ab cdef1", "\u00e9bcdef1", "\u00e9bcdef12", "abcdef1\x00", "0x123456",
            "-1234567", "AbCdEf12", "FFFFFFFF", "00000000"]
ODD_LABELS = ["0.0", "2", "x", " 1", "01"]


def random_transform(seed: int, missing: str = "nan", extremes: bool = False) -> FeatureTransform:
    """A transform with random 8-hex vocabularies; C1's is empty (all rare), C2's the key-space ends if `extremes`."""
    rng = np.random.default_rng(seed)
    vocab = {c: sorted({f"{v:08x}" for v in rng.integers(0, 2**32, int(rng.integers(0, 40)))}) for c in CAT_COLUMNS}
    vocab[CAT_COLUMNS[0]] = []
    if extremes:
        vocab[CAT_COLUMNS[1]] = ["00000000", "ffffffff"]
    return FeatureTransform(vocab=vocab, missing=missing)


def random_lines(transform: FeatureTransform, seed: int, n: int, odd: float, short: float, *,
                 odd_ints: Sequence[str] = ODD_INTS, odd_cats: Sequence[str] = ODD_CATS,
                 wide_ints: bool = False) -> list[str]:
    """Random raw Criteo lines; `odd` is the chance of an odd field, `short` of a cut/extra/blank line.

    Categoricals come from `transform`'s vocabularies half the time (in random case); `wide_ints`
    also draws integers up to 15 digits.
    """
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        fields = [rng.choice(["", "0", "1"]) if rng.random() > odd else rng.choice(ODD_LABELS)]
        for _c in INT_COLUMNS:
            r = rng.random()
            if r < 0.2:
                fields.append("")
            elif r < 0.2 + odd:
                fields.append(rng.choice(odd_ints))
            elif wide_ints:
                fields.append(str(rng.choice([rng.randint(-5, 10**6), rng.randint(-(10**15) + 1, 10**15 - 1)])))
            else:
                fields.append(str(rng.randint(-5, 10**6)))
        for c in CAT_COLUMNS:
            vocab, r = transform.vocab[c], rng.random()
            if r < 0.2:
                v = ""
            elif r < 0.2 + odd:
                v = rng.choice(odd_cats)
            elif vocab and r < 0.7:
                v = rng.choice(vocab)
            else:
                v = f"{rng.getrandbits(32):08x}"
            fields.append(v.upper() if rng.random() < 0.2 else v)
        if rng.random() < short:
            fields = rng.choice([fields[: rng.randint(1, 39)], [*fields, "1"], [""]])  # cut, extra, blank line
        lines.append("\t".join(fields))
    return lines
