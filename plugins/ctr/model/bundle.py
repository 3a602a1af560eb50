"""The model bundle: a directory with model.txt, features.json, metadata.json, probe.json, MLmodel, manifest.json.

No pickles: the booster is LightGBM's text format, the transform is JSON, and MLflow loads the
bundle through `ctr.model.pyfunc` (a loader module), so the same directory is an MLflow model.

A bundle is an artefact whose integrity is checked before anything parses it: `write_manifest`
(called by `finalize_bundle`, the one way bundles are finished, by the local trainer and the Spark job alike) records the size and
SHA-256 of every file in `manifest.json`. `Bundle.load`, the one loader (`ctr score`, `ctr evaluate`,
`ctr serve`, `/admin/load`, the rollout), reads each listed file once into memory, refusing anything
that is not a regular file (a named pipe can never block it), checks size and hash, and only then
parses the booster from those bytes and derives the version and digest from the same bytes. A
truncated or half-copied file is a BundleError before LightGBM sees a byte (LightGBM aborts the
whole process on some damaged model files). Bundles without a manifest are refused;
`ctr bundle finalize DIR` re-finalises one after checking it in a throwaway child process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr.features.transform import FeatureTransform
from ctr.schema import CAT_COLUMNS, INT_COLUMNS, LABEL

if TYPE_CHECKING:
    from ctr.training.trainer import TrainConfig

REQUIRED_FILES = ("model.txt", "features.json", "metadata.json")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20
PROBE_TOLERANCE = 1e-12
# A version names the model in headers, metrics labels and logs: short, printable, no separators.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
REFINALIZE_HINT = "re-finalise it with `ctr bundle finalize {path}` (checks it in a child process first) or retrain"


class BundleError(ValueError):
    """The bundle cannot be used; the message names the file and the problem."""


def _digest_of(model_txt: bytes, features_json: bytes) -> str:
    h = hashlib.sha256()
    for name, data in (("model.txt", model_txt), ("features.json", features_json)):
        h.update(name.encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def bundle_digest(path: Path) -> str:
    """sha256 over the files that define predictions (model, features)."""
    p = Path(path)
    return _digest_of((p / "model.txt").read_bytes(), (p / "features.json").read_bytes())


def check_version(version: str, source: str) -> str:
    """`version` if it matches VERSION_PATTERN, else BundleError naming `source`."""
    if not VERSION_PATTERN.fullmatch(version):
        shown = repr(version[:40]) + ("..." if len(version) > 40 else "")
        raise BundleError(f"{source}: model version {shown} ({len(version)} chars) is not 1-64 characters of "
                          "letters, digits and . _ + - (starting with a letter or digit); refused")
    return version


# ---- the manifest -----------------------------------------------------------------------------
def write_manifest(bundle_dir: Path) -> dict[str, Any]:
    """Record size and SHA-256 of every regular file in `bundle_dir` (but the manifest) in manifest.json."""
    d = Path(bundle_dir)
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(d.iterdir()):
        if p.name == MANIFEST or p.name.startswith("."):
            continue
        st = p.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{p} is not a regular file; a bundle holds only regular files")
        data = p.read_bytes()
        files[p.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise BundleError(f"model bundle {d} lacks {', '.join(missing)}; cannot finalise it")
    doc = {"format": MANIFEST_FORMAT, "files": files}
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(d / MANIFEST)
    return doc


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of regular file `path` (at most `limit`), never blocking on a pipe or device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BundleError(f"{path} is missing") from None
    except OSError as e:
        raise BundleError(f"{path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file (a named pipe, device, socket or directory); refused")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BundleError(f"{path} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # what we opened, not what the name pointed at a moment ago
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path} is not a regular file (a named pipe, device, socket or directory); refused")
        if st.st_size > limit:
            raise BundleError(f"{path} is {st.st_size} bytes, more than the {limit} expected")
        chunks, size = [], 0
        while size <= limit:
            part = os.read(fd, min(1 << 24, limit + 1 - size))
            if not part:
                break
            chunks.append(part)
            size += len(part)
        return b"".join(chunks)
    except OSError as e:
        raise BundleError(f"{path} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)


def _manifest(p: Path) -> dict[str, dict[str, Any]]:
    if not (p / MANIFEST).exists() and not (p / MANIFEST).is_symlink():
        raise BundleError(f"model bundle {p} has no {MANIFEST} (sizes and SHA-256 of its files, written when a "
                          f"bundle is finalised); it was written before manifests existed or copied without it: "
                          + REFINALIZE_HINT.format(path=p))
    raw = _read_regular(p / MANIFEST, MAX_MANIFEST_BYTES)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{p / MANIFEST} is not JSON ({e}); " + REFINALIZE_HINT.format(path=p)) from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise BundleError(f"{p / MANIFEST} is not a format-{MANIFEST_FORMAT} manifest; " + REFINALIZE_HINT.format(path=p))
    for name, entry in files.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise BundleError(f"{p / MANIFEST} lists {str(name)[:60]!r}, not a file name in the bundle")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"])
                and isinstance(entry.get("size"), int) and not isinstance(entry["size"], bool) and entry["size"] >= 0):
            raise BundleError(f"{p / MANIFEST}: entry for {name} needs a sha256 (64 hex) and a size (bytes)")
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise BundleError(f"model bundle {p} lacks {', '.join(missing)} (not in {MANIFEST})")
    return files


def read_bundle_files(path: str | Path) -> dict[str, bytes]:
    """Every file the manifest lists, read once into memory and checked against its size and SHA-256."""
    p = Path(path)
    if not p.is_dir():
        raise BundleError(f"model bundle {p} is not a directory")
    files = _manifest(p)
    if "registry.json" not in files and (p / "registry.json").exists():
        raise BundleError(f"{p / 'registry.json'} is not in {MANIFEST} (it would rename the model unchecked); "
                          + REFINALIZE_HINT.format(path=p))
    out: dict[str, bytes] = {}
    for name, entry in sorted(files.items()):
        want = entry["size"]
        data = _read_regular(p / name, want)
        if len(data) != want:
            raise BundleError(f"{p / name} is {'more than ' if len(data) > want else ''}{len(data)} bytes, its manifest "
                              f"says {want}: truncated, half-copied or replaced; refused")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(f"{p / name} does not match its SHA-256 in {MANIFEST}: damaged or replaced; refused")
        out[name] = data
    return out


def _json_file(p: Path, files: Mapping[str, bytes], name: str) -> Any:
    try:
        return json.loads(files[name])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{p / name} is not JSON: {e}") from None


@dataclass
class Bundle:
    path: Path
    booster: Any
    transform: FeatureTransform
    metadata: dict[str, Any]
    digest: str
    probe: dict[str, Any] | None = None
    version: str = ""
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # the checked bytes it was parsed from

    @classmethod
    def load(cls, path: str | Path, *, check_probe: bool = True) -> Bundle:
        """The one loader: manifest-checked bytes -> booster, transform, version (BundleError if refused)."""
        p = Path(path)
        return cls.from_files(p, read_bundle_files(p), check_probe=check_probe)

    @classmethod
    def from_files(cls, p: Path, files: Mapping[str, bytes], *, check_probe: bool = True) -> Bundle:
        """Parse a bundle from its files' bytes (already checked against the manifest, or just written)."""
        import lightgbm as lgb

        try:
            model_str = files["model.txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise BundleError(f"{p / 'model.txt'} is not UTF-8 text: {e}") from None
        try:
            booster = lgb.Booster(model_str=model_str)
        except Exception as e:  # LightGBM raises LightGBMError with a C++ message
            raise BundleError(f"{p / 'model.txt'} is not a LightGBM model: {str(e)[:300]}") from None
        try:
            transform = FeatureTransform.from_json(_json_file(p, files, "features.json"), str(p / "features.json"))
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{p / 'features.json'} is unusable: {e}") from None
        metadata = _json_file(p, files, "metadata.json")
        if not isinstance(metadata, dict):
            raise BundleError(f"{p / 'metadata.json'} is not a JSON object")
        if "registry.json" in files:  # written by build_image: the registry version it serves as
            reg = _json_file(p, files, "registry.json")
            if not isinstance(reg, dict) or "version" not in reg:
                raise BundleError(f"{p / 'registry.json'} needs a version")
            metadata = {**metadata, "model_version": str(reg["version"]), "model_name": reg.get("name")}
        if booster.num_feature() != transform.n_features:
            raise BundleError(f"{p / 'model.txt'} expects {booster.num_feature()} features, but features.json gives "
                              f"{transform.n_features} (39 codes + {transform.n_features - 39} derived)")
        digest = _digest_of(files["model.txt"], files["features.json"])
        raw_version = metadata.get("model_version")
        version = check_version(str(raw_version), str(p / "metadata.json")) if raw_version else digest[:12]
        probe = None
        if "probe.json" in files:
            probe = _json_file(p, files, "probe.json")
            if not (isinstance(probe, dict) and isinstance(probe.get("rows"), list)
                    and isinstance(probe.get("probabilities"), list)):
                raise BundleError(f"{p / 'probe.json'} needs rows and probabilities")
        b = cls(path=p, booster=booster, transform=transform, metadata=metadata, digest=digest, probe=probe,
                version=version, files=dict(files))
        if check_probe:
            b.check_probe()
        return b

    # ---- prediction ------------------------------------------------------------------
    def predict_matrix(self, x: np.ndarray, num_threads: int = 0) -> np.ndarray:
        """Codes matrix (n, 39; every encoder's output) -> probabilities; the derived features are
        added here (`FeatureTransform.derive`), the one place between the codes and the booster."""
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        return self.booster.predict(self.transform.derive(x), num_threads=num_threads)

    def predict_table(self, table: pa.Table) -> np.ndarray:
        return self.predict_matrix(self.transform.transform_table(table))

    def predict_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        x = np.array([self.transform.row(r) for r in rows], dtype=np.float64).reshape(len(rows), -1)
        return self.predict_matrix(x, num_threads=1)

    # ---- self-check ------------------------------------------------------------------
    def check_probe(self) -> None:
        """Known inputs must give their recorded outputs (refuses a corrupt or mismatched bundle)."""
        if self.probe is None:
            raise BundleError(f"model bundle {self.path} lacks probe.json (known inputs and outputs)")
        try:
            got = self.predict_rows(self.probe["rows"])
            want = np.asarray(self.probe["probabilities"], dtype=np.float64)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise BundleError(f"{self.path / 'probe.json'} is unusable: {e}") from None
        if got.shape != want.shape or not np.all(np.abs(got - want) <= PROBE_TOLERANCE):
            raise BundleError(
                f"model bundle {self.path} fails its probe: predictions differ from probe.json "
                f"(max |diff| {float(np.max(np.abs(got - want))) if got.shape == want.shape else 'shape'})"
            )


def write_probe(bundle_dir: Path, rows: list[dict[str, Any]], bundle: Bundle) -> None:
    probs = bundle.predict_rows(rows)
    (bundle_dir / "probe.json").write_text(json.dumps({"rows": rows, "probabilities": probs.tolist()}) + "\n")


def table_from_records(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validated row dicts (absent/None = missing) -> Arrow table with I/C columns."""
    cols: dict[str, pa.Array] = {}
    for c in INT_COLUMNS:
        cols[c] = pa.array([r.get(c) for r in records], type=pa.float64())
    for c in CAT_COLUMNS:
        cols[c] = pc.utf8_lower(pa.array([r.get(c) for r in records], type=pa.string()))
    return pa.table(cols)


def table_from_frame(df: Any) -> pa.Table:
    """pandas DataFrame (MLflow pyfunc input) -> Arrow table with I/C columns; NaN = missing."""
    n = len(df)
    cols: dict[str, pa.Array] = {}
    for c in INT_COLUMNS:
        if c in df.columns:
            v = np.asarray(df[c].to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
            cols[c] = pa.array(v, type=pa.float64(), from_pandas=True)
        else:
            cols[c] = pa.nulls(n, pa.float64())
    for c in CAT_COLUMNS:
        if c in df.columns:
            vals = [None if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v) for v in df[c]]
            cols[c] = pc.utf8_lower(pa.array(vals, type=pa.string()))
        else:
            cols[c] = pa.nulls(n, pa.string())
    return pa.table(cols)


# ---- finishing a bundle -------------------------------------------------------------------------
def clean_metadata(bundle_dir: Path) -> list[str]:
    """Rewrite metadata.json as strict JSON: a NaN/Inf number becomes null; returns the keys changed."""
    import logging

    path = Path(bundle_dir) / "metadata.json"
    doc = json.loads(path.read_text())  # Python's reader accepts the NaN that json.dumps wrote
    changed: list[str] = []

    def fix(v: Any, key: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            changed.append(key)
            return None
        if isinstance(v, dict):
            return {k: fix(x, f"{key}.{k}" if key else str(k)) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x, f"{key}[{i}]") for i, x in enumerate(v)]
        return v

    doc = fix(doc, "")
    if changed:
        logging.getLogger(__name__).warning(
            "metadata.json: %s not a finite number (e.g. valid_auc is NaN when the validation days hold only one "
            "label); written as null", ", ".join(changed))
    path.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return changed


_CHECK_UNMANIFESTED = """
import hashlib, json, sys
from pathlib import Path
from ctr.model.bundle import MANIFEST, Bundle
p = Path(sys.argv[1])
files = {q.name: q.read_bytes() for q in sorted(p.iterdir()) if q.is_file() and q.name != MANIFEST
         and not q.name.startswith(".")}
v = Bundle.from_files(p, files, check_probe=True).version
print(json.dumps({"version": v, "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                                         for n, b in files.items()}}))
"""


def refinalize(bundle_dir: Path, timeout: float = 300.0) -> str:
    """Give a bundle written before manifests a manifest, after it loads and passes its probe in a child process.

    The child parses the unchecked files (LightGBM may abort a process on a damaged model.txt, so
    never this one); only if it reports a version is the manifest written. Returns the version."""
    p = Path(bundle_dir)
    if not p.is_dir():
        raise BundleError(f"model bundle {p} is not a directory")
    for name in (*REQUIRED_FILES, "probe.json"):
        if not (p / name).is_file() or not stat.S_ISREG((p / name).lstat().st_mode):
            raise BundleError(f"model bundle {p} lacks {name} as a regular file; retrain it")
    try:
        r = subprocess.run([sys.executable, "-c", _CHECK_UNMANIFESTED, str(p)], capture_output=True, text=True,
                           errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BundleError(f"checking {p} took over {timeout:.0f}s; not finalised") from None
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        why = f"the check crashed with {signal.Signals(-r.returncode).name}" if r.returncode < 0 else \
            (lines[-1] if lines else f"exit {r.returncode}")
        raise BundleError(f"model bundle {p} failed its load/probe check ({why[:300]}); not finalised: retrain it")
    try:  # the manifest of exactly the bytes the child checked: a file changed since fails the load below
        checked = json.loads(r.stdout.strip().splitlines()[-1])["files"]
    except (IndexError, KeyError, json.JSONDecodeError):
        raise BundleError(f"checking {p} printed no result; not finalised") from None
    tmp = p / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": checked}, indent=1, sort_keys=True) + "\n")
    tmp.replace(p / MANIFEST)
    return Bundle.load(p).version


# ---- writing a bundle: the one metadata builder and the one finisher (local trainer and Spark job) ----
# Every bundle's metadata.json carries these keys (engine-specific lineage such as the Spark master is
# added through `extra`); tests/integration/test_spark_job.py compares a local and a Spark bundle's keys.
METADATA_KEYS = (
    "best_iteration", "click_rate", "code_version", "data_fingerprints", "data_interval", "early_stopping", "engine",
    "feature_notes", "lightgbm_version", "max_vocab", "min_count", "missing", "num_threads", "params", "rounds", "rows",
    "sample_fraction", "seed", "trees_built", "valid_auc", "valid_logloss", "validation", "vocab_sizes",
)


def code_version() -> str:
    """`ctr` version plus the git commit when running from a checkout."""
    import ctr

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{ctr.__version__}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return ctr.__version__


def bundle_metadata(cfg: TrainConfig, *, engine: str, validation: str, rows_train: int, rows_valid: int,
                    click_rate: float, transform: FeatureTransform, feature_notes: Sequence[str],
                    params: Mapping[str, Any], trees_built: int, best_iteration: int, valid_auc: float | None,
                    valid_logloss: float | None, data_fingerprints: Mapping[str, str],
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """metadata.json of a freshly trained bundle: exactly `METADATA_KEYS`, then `extra` (lineage) on top."""
    import lightgbm as lgb

    doc = {
        "data_interval": {"start": cfg.start.isoformat(), "end": cfg.end.isoformat()},
        "validation": validation,
        "rows": {"train": int(rows_train), "valid": int(rows_valid), "total": int(rows_train + rows_valid)},
        "click_rate": float(click_rate),
        "vocab_sizes": transform.vocab_sizes,
        "min_count": cfg.min_count,
        "max_vocab": cfg.max_vocab,
        "missing": cfg.missing,
        "feature_notes": list(feature_notes),
        "params": dict(params),
        "rounds": cfg.rounds,
        "early_stopping": cfg.early_stopping,
        "trees_built": int(trees_built),
        "best_iteration": int(best_iteration),
        "valid_auc": valid_auc,
        "valid_logloss": valid_logloss,
        "seed": cfg.seed,
        "num_threads": cfg.num_threads,
        "sample_fraction": cfg.sample_fraction,
        "code_version": code_version(),
        "lightgbm_version": lgb.__version__,
        "engine": engine,
        "data_fingerprints": dict(data_fingerprints),
    }
    assert tuple(sorted(doc)) == METADATA_KEYS, "bundle_metadata and METADATA_KEYS disagree"
    return {**doc, **(extra or {})}


def finalize_bundle(out_dir: Path, sample: pa.Table, metadata: Mapping[str, Any] | None = None) -> None:
    """Finish a bundle once model.txt and features.json exist: metadata.json (when given), strict-JSON
    metadata, probe.json, MLmodel, manifest.

    Every bundle writer (the local trainer, the Spark job) ends here; the manifest (sizes and SHA-256
    of every file, `write_manifest`) is written last, and the bundle is then loaded back through the
    one loader so a bundle that leaves here is one the service accepts.
    """
    from ctr.model.pyfunc import write_mlmodel

    out_dir = Path(out_dir)
    if metadata is not None:
        (out_dir / "metadata.json").write_text(json.dumps(dict(metadata), indent=1, sort_keys=True) + "\n")
    clean_metadata(out_dir)
    files = {n: (out_dir / n).read_bytes() for n in ("model.txt", "features.json", "metadata.json")}
    b = Bundle.from_files(out_dir, files, check_probe=False)
    rows = [
        {k: v for k, v in r.items() if k != LABEL and v is not None}
        for r in sample.slice(0, 16).to_pylist()
    ]
    rows.append({})  # an all-missing row
    rows.append({"C1": "ffffffff", "I1": 3})  # an unseen categorical value
    write_probe(out_dir, rows, b)
    write_mlmodel(out_dir, model_uuid=bundle_digest(out_dir)[:32])
    write_manifest(out_dir)
    Bundle.load(out_dir)
