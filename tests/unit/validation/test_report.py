"""The evaluation report renders, embeds its PNGs, and draws both models' curves."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from ctr.validation.gate import GateConfig, decide
from ctr.validation.metrics import compare
from ctr.validation.report import CANDIDATE_COLOR, CHAMPION_COLOR, FIGURES, roc_figure, write_report
from matplotlib.colors import to_rgb
from matplotlib.image import imread


def _data(n: int = 5000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    z = rng.normal(-1.2, 1.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return y, 1 / (1 + np.exp(-(z + rng.normal(0, 0.6, n)))), 1 / (1 + np.exp(-z))


def _has_color(png: bytes, color: str, tol: float = 0.04) -> bool:
    rgb = imread(io.BytesIO(png), format="png")[..., :3]
    return bool((np.abs(rgb - np.array(to_rgb(color))).max(axis=-1) < tol).any())


def test_roc_figure_has_both_curves() -> None:
    y, cand, champ = _data()
    ax = roc_figure(y, cand, champ).axes[0]
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert labels[0].startswith("candidate (AUC ") and labels[1].startswith("champion (AUC ")
    assert len(ax.get_lines()[0].get_xdata()) > 100


def test_report_renders_with_embedded_pngs_and_both_curves(tmp_path) -> None:
    y, cand, champ = _data()
    doc = compare(y, cand, champ)
    doc["gate"] = decide(doc, GateConfig())
    path = write_report(tmp_path / "report", y, cand, champ, doc, title="ctr_retrain 2026-11-20")
    page = path.read_text()
    assert path.name == "report.html"
    assert 'id="gate">REJECTED<' in page and "max_auc_drop" in page
    embedded = dict(re.findall(r'<img id="(\w+)" alt="\w+" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page))
    assert set(embedded) == set(FIGURES)
    for name in FIGURES:
        png = base64.b64decode(embedded[name])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert png == (tmp_path / "report" / f"{name}.png").read_bytes()
    for name in ("roc", "calibration"):  # both models are drawn, each in its colour
        png = base64.b64decode(embedded[name])
        assert _has_color(png, CANDIDATE_COLOR) and _has_color(png, CHAMPION_COLOR), name
    assert f"{doc['candidate']['auc']:.5f}" in page and f"{doc['baseline']['auc']:.5f}" in page


def test_first_run_report_has_only_the_candidate(tmp_path) -> None:
    y, cand, _ = _data(2000)
    doc = compare(y, cand, None)
    doc["gate"] = decide(doc, GateConfig(min_auc=0.5, max_ece=1.0))
    page = write_report(tmp_path, y, cand, None, doc).read_text()
    assert 'id="gate">PASSED<' in page and "first model" in page
    png = base64.b64decode(re.search(r'id="roc" alt="roc" src="data:image/png;base64,([^"]+)"', page).group(1))
    assert _has_color(png, CANDIDATE_COLOR) and not _has_color(png, CHAMPION_COLOR)
