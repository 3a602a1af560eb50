"""The pipeline's Airflow assets: the landing zone check_data reads, and the champion model promote announces.

`promote` (ctr_retrain) has `CHAMPION` as its outlet: each success emits one asset event whose extra
says which version is champion now (`version`, `auc`, `logical_date`, `image`, plus `model_name`,
`promoted_version` and `champion_changed`). `ctr_batch_score` is scheduled on `CHAMPION` and reads the
extra back with `champion_from_events`, which fails naming the first missing key.
The URIs name logical things, not storage paths: the landing root and the registry are configuration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from airflow.sdk import Asset

MODEL_NAME = os.environ.get("CTR_MODEL_NAME", "ctr-lightgbm")  # parse time, as the registry default
CHAMPION = Asset(name="ctr_champion", uri=f"ctr://models/{MODEL_NAME}/champion", group="model")
LANDING = Asset(name="ctr_landing_days", uri="ctr://landing/criteo-daily", group="data")
REQUIRED_EXTRA = ("version", "auc", "logical_date", "image")


def champion_extra(champ: Any, promoted: str, image: str | None, model_name: str) -> dict[str, Any]:
    """The asset event's extra for `champ` (a registry VersionInfo) after `promoted` was verified.

    `image` is this run's image when `promoted` became champion; otherwise the champion's own
    (its `ctr.image` tag, written by the promote that made it champion)."""
    metrics = champ.tags.get("metrics") or "{}"
    try:
        auc = json.loads(metrics).get("auc")
    except ValueError:
        auc = None
    changed = champ.version == str(promoted)
    return {"version": champ.version, "auc": auc, "logical_date": champ.logical_date,
            "image": image if changed else champ.tags.get("ctr.image"), "model_name": model_name,
            "promoted_version": str(promoted), "champion_changed": changed}


def champion_from_events(events: Mapping[Any, Any]) -> dict[str, Any]:
    """The extra of the newest champion event among this run's triggering asset events, all keys checked."""
    found = []
    for asset, evs in events.items():
        if getattr(asset, "uri", asset) == CHAMPION.uri:
            found.extend(evs)
    if not found:
        raise ValueError(f"no {CHAMPION.uri} asset event triggered this run (it runs when ctr_retrain promotes); "
                         f"events: {sorted(str(getattr(a, 'uri', a)) for a in events)}")
    ev = max(found, key=lambda e: e.timestamp)
    extra = dict(ev.extra or {})
    for key in REQUIRED_EXTRA:
        if extra.get(key) in (None, ""):
            raise ValueError(f"the {CHAMPION.uri} asset event from {ev.source_dag_id}/{ev.source_run_id} has no "
                             f"{key!r} in its extra (has: {sorted(extra)}); cannot score without it")
    return {**extra, "source_dag_id": ev.source_dag_id, "source_run_id": ev.source_run_id,
            "event_timestamp": ev.timestamp.isoformat()}
