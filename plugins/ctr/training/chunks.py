"""Encoded rows spilled to disk chunk by chunk, streamed into LightGBM through `lightgbm.Sequence`.

`train` encodes each staged chunk with `FeatureTransform.transform_table` (the serving transform)
and appends it here instead of keeping it: one file per chunk holding the 13 integer features as
float64 (exact) followed by the 26 categorical codes as float32 (codes are small integers or NaN,
exact in float32): 156 bytes a row on disk. LightGBM reads them back through one `Sequence` per
chunk: it samples `bin_construct_sample_cnt` rows to build the bin mappers, then pushes every
chunk in one batch. At most one decoded chunk is held at a time (`EncodedChunks.load` caches the
last one), so the process holds LightGBM's binned Dataset (about 1 byte per feature value) plus
one chunk, never a matrix of all rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import lightgbm as lgb
import numpy as np

from ctr.schema import CAT_COLUMNS, FEATURE_COLUMNS, INT_COLUMNS

N_INT, N_CAT = len(INT_COLUMNS), len(CAT_COLUMNS)
assert FEATURE_COLUMNS == INT_COLUMNS + CAT_COLUMNS  # the file layout relies on this order
BYTES_PER_ROW = N_INT * 8 + N_CAT * 4


class EncodedChunks:
    """Encoded chunks of one role (train or valid) on disk, with their labels in memory (float32)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sizes: list[int] = []
        self._labels: list[np.ndarray] = []
        self._folds: list[np.ndarray] = []
        self._cached: tuple[int, np.ndarray] | None = None
        # codes (n x 39) + each row's fold -> the model's input (FeatureTransform.derive); None = the codes
        self.derive: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def append(self, x: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> None:
        """Store one encoded chunk (float64, n x 39), its labels and its rows' folds (for out-of-fold statistics)."""
        i = len(self.sizes)
        with open(self.dir / f"chunk-{i:06d}.bin", "wb") as f:
            np.ascontiguousarray(x[:, :N_INT]).tofile(f)
            x[:, N_INT:].astype(np.float32).tofile(f)
        self.sizes.append(len(x))
        self._labels.append(np.asarray(y, dtype=np.float32))
        self._folds.append(np.zeros(len(x), dtype=np.intp) if folds is None else np.asarray(folds, dtype=np.intp))

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def y(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.empty(0, dtype=np.float32)

    def load(self, i: int) -> np.ndarray:
        """Chunk i as the float64 matrix the transform produced, derived features appended by `derive`
        (cached: LightGBM reads in order)."""
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        n = self.sizes[i]
        with open(self.dir / f"chunk-{i:06d}.bin", "rb") as f:
            ints = np.fromfile(f, dtype=np.float64, count=n * N_INT).reshape(n, N_INT)
            cats = np.fromfile(f, dtype=np.float32, count=n * N_CAT).reshape(n, N_CAT)
        x = np.empty((n, N_INT + N_CAT), dtype=np.float64)
        x[:, :N_INT] = ints
        x[:, N_INT:] = cats
        if self.derive is not None:
            x = self.derive(x, self._folds[i])
        self._cached = (i, x)
        return x

    def matrices(self) -> Iterator[np.ndarray]:
        for i in range(len(self.sizes)):
            yield self.load(i)
        self._cached = None

    def sequences(self) -> list[ChunkSequence]:
        return [ChunkSequence(self, i) for i in range(len(self.sizes))]

    def release(self) -> None:
        self._cached = None


class ChunkSequence(lgb.Sequence):
    """One spilled chunk as a `lightgbm.Sequence`; LightGBM pushes it in one batch."""

    def __init__(self, store: EncodedChunks, i: int) -> None:
        self.store, self.i = store, i
        self.batch_size = max(1, store.sizes[i])

    def __len__(self) -> int:
        return self.store.sizes[self.i]

    def __getitem__(self, idx: int | slice) -> np.ndarray:
        return self.store.load(self.i)[idx]
