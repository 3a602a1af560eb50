"""`make bench`: run every benchmark script in turn; each writes benchmarks/results/<name>.json.

    python benchmarks/run_all.py [name ...]      # default: all of them, in the order below
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["data", "train", "quality", "serve", "rollout", "synapseml"]


def main(argv: list[str]) -> int:
    names = argv or [n for n in ORDER if (HERE / f"{n}.py").exists()]
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"bench: no benchmark named {name!r} ({script} is missing)", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        rc = subprocess.run([sys.executable, str(script)]).returncode
        print(f"bench: {name} exit {rc} in {time.monotonic() - t0:.0f}s -> benchmarks/results/{name}.json", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
