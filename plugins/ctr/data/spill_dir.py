"""A temporary folder for spill files, removed on close or when its owner is collected."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path


class SpillDir:
    """A temporary folder for spill files (next to the bundle by default), removed on close."""

    def __init__(self, parent: Path | None = None, prefix: str = "ctr-spill-") -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> SpillDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
