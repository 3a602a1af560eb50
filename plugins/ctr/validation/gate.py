"""The promotion gate: decides from freshly computed metrics (evaluate.compare), never from tags.

Rules (each threshold is a DAG param; defaults below):
  * candidate AUC >= min_auc                                     (always)
  * candidate ECE <= max_ece                                     (always)
  * lower 95% CI bound of AUC(candidate) - AUC(champion) >= -max_auc_drop   (with a champion)
  * logloss(candidate) - logloss(champion) <= max_logloss_rise              (with a champion)
  * every feature's PSI, holdout day vs training range, <= max_feature_psi  (when the document has
    a `drift` section; features from `warn_feature_psi` up are named in `warnings`, not rejected)
`force_deploy` passes a failing candidate, and says so in the reasons (and register records it in
the version's tags). The first model (no champion) is held to the absolute floors only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GateConfig:
    min_auc: float = 0.70
    max_auc_drop: float = 0.005
    max_logloss_rise: float = 0.005
    max_ece: float = 0.05
    max_feature_psi: float = 0.25
    warn_feature_psi: float = 0.1
    force_deploy: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GateConfig:
        """The gate's thresholds from DAG params (unknown keys ignored, missing ones defaulted)."""
        kw: dict[str, Any] = {}
        for k in asdict(cls()):
            v = params.get(k)
            if v is None:
                continue
            if k == "force_deploy":
                if isinstance(v, str):
                    v = v.strip().lower() in ("1", "true", "yes", "on")
                kw[k] = bool(v)
                continue
            try:
                kw[k] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"gate param {k}={v!r} is not a number; set it like {getattr(cls(), k)}") from None
            if math.isnan(kw[k]) or kw[k] < 0:
                raise ValueError(f"gate param {k}={v!r} must be a number >= 0")
        return cls(**kw)


def verdict(decision: dict[str, Any]) -> str:
    """PASSED, PASSED (forced) or REJECTED: the word the log and the UI show."""
    if decision.get("forced"):
        return "PASSED (forced)"
    return "PASSED" if decision["passed"] else "REJECTED"


def decide(metrics: dict[str, Any], cfg: GateConfig) -> dict[str, Any]:
    """Return {"passed", "forced", "reasons", "checks"}; reasons name every failed rule with numbers."""
    cand = metrics["candidate"]
    checks: list[dict[str, Any]] = []

    def check(rule: str, ok: bool, detail: str) -> None:
        checks.append({"rule": rule, "ok": bool(ok), "detail": detail})

    a = cand["auc"]
    check("min_auc", not math.isnan(a) and a >= cfg.min_auc, f"candidate AUC {a:.4f} vs floor {cfg.min_auc:.4f}")
    e = cand["ece"]
    check("max_ece", not math.isnan(e) and e <= cfg.max_ece, f"candidate ECE {e:.4f} vs limit {cfg.max_ece:.4f} "
          f"(mean predicted {cand.get('mean_pred', math.nan):.4f}, observed click rate {cand.get('ctr', math.nan):.4f})")
    warnings: list[str] = []
    drift = metrics.get("drift")
    if drift is not None:
        from ctr.monitoring.drift import describe, over, warned

        psi = drift["features"]
        bad = over(psi, cfg.max_feature_psi)
        check("max_feature_psi", not bad,
              (f"{len(bad)} feature(s) drifted on the holdout day vs the training range: {describe(bad)} "
               f"(limit {cfg.max_feature_psi:g})") if bad else
              f"largest feature PSI {max(psi.values(), default=0.0):.3f} (limit {cfg.max_feature_psi:g})")
        warn = warned(psi, cfg.warn_feature_psi, cfg.max_feature_psi)
        if warn:
            warnings.append(f"feature_psi: {describe(warn)} (warning from {cfg.warn_feature_psi:g}, "
                            f"reject above {cfg.max_feature_psi:g})")
        sp = drift.get("score_psi")
        if sp is not None and sp > cfg.warn_feature_psi:
            warnings.append(f"score_psi: candidate scores on the holdout vs the validation day PSI {sp:.3f} "
                            f"(warning from {cfg.warn_feature_psi:g})")
    base = metrics.get("baseline")
    if base is not None:
        d = metrics["auc_diff"]
        check(
            "max_auc_drop",
            not math.isnan(d["ci_low"]) and d["ci_low"] >= -cfg.max_auc_drop,
            f"AUC diff {d['estimate']:+.4f} (95% CI {d['ci_low']:+.4f}..{d['ci_high']:+.4f}, {d['method']}); "
            f"lower bound must be >= {-cfg.max_auc_drop:+.4f} (champion AUC {base['auc']:.4f})",
        )
        rise = cand["logloss"] - base["logloss"]
        check(
            "max_logloss_rise",
            not math.isnan(rise) and rise <= cfg.max_logloss_rise,
            f"logloss {cand['logloss']:.4f} vs champion {base['logloss']:.4f} (rise {rise:+.4f}, limit {cfg.max_logloss_rise:+.4f})",
        )
    failed = [c for c in checks if not c["ok"]]
    reasons = [f"{c['rule']}: {c['detail']}" for c in failed]
    passed = not failed
    forced = False
    if failed and cfg.force_deploy:
        passed, forced = True, True
        reasons.append("force_deploy=true: deploying despite the failed rules above")
    if passed and not failed:
        reasons.append("all rules passed" + ("" if base is not None else " (first model: absolute floors only)"))
    return {"passed": passed, "forced": forced, "reasons": reasons, "checks": checks, "warnings": warnings,
            "drifted": [c for c, _ in over(drift["features"], cfg.max_feature_psi)] if drift is not None else [],
            "config": asdict(cfg)}
