"""The labelled-anomaly curve: its data for Compare, and the Train page's "Is labelling worth it?" run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dashboard.services.data import _dataset
from dashboard.services.jobs import Job, start_run
from dashboard.services.results import ok_runs
from engine import labelled_curve as lc
from engine import registry


def labelled_curve(results: dict[str, Any] | None) -> dict[str, Any] | None:
    """The curve data (engine.labelled_curve.labelled_curve) when the results hold several K, else None."""
    return lc.labelled_curve(results)


@dataclass(frozen=True)
class CurvePlan:
    """What "Is labelling worth it?" would run: the weak methods, the unsupervised reference, the K, and why not
    (problem) or what was capped (note)."""

    weak: list[str]
    reference: str | None
    ks: list[int]
    note: str | None
    problem: str | None

    @property
    def methods(self) -> list[str]:
        return [*self.weak, *([self.reference] if self.reference else [])]


def _best_unsupervised(picked: list[str], results: dict[str, Any] | None) -> str | None:
    """The best unsupervised method of the current results (by image AUROC), else the first one picked, else
    PatchCore when registered."""
    scored = [r for r in ok_runs(results) if r.get("labeled_k") is None
              and (r.get("metrics") or {}).get("image_auroc") is not None
              and registry.info(r["method"]).supervision == "none"]
    if scored:
        return max(scored, key=lambda r: r["metrics"]["image_auroc"])["method"]
    unsup = [m for m in picked if registry.info(m).supervision == "none"]
    if unsup:
        return unsup[0]
    names = {m.name for m in registry.available()}
    return "patchcore" if "patchcore" in names else None


def curve_plan(dataset_path: str, picked: list[str], results: dict[str, Any] | None) -> CurvePlan:
    """The plan for the picked methods on this dataset: K = 0, 1, 3, 10 capped by its anomalous test images."""
    ds = _dataset(dataset_path)
    per_type: dict[str, int] = {}
    for s in ds.test:
        if s.label == 1:
            per_type[s.defect_type] = per_type.get(s.defect_type, 0) + 1
    ks, note = lc.capped_ks(per_type)
    weak = [m for m in picked if registry.info(m).supervision == "weak"]
    reference = _best_unsupervised(picked, results)
    problem = None
    if not weak:
        problem = "Pick at least one weakly supervised method (they learn from labelled defects) to draw the curve."
    elif len(ks) < 2:
        problem = f"This dataset cannot give a labelled-anomaly curve: {note}."
    return CurvePlan(weak=weak, reference=reference, ks=ks, note=note, problem=problem)


def start_curve(session: str, dataset_path: str, plan: CurvePlan, *, image_size: int, backbone: str,
                preset: str) -> Job:
    """Queue the plan's run (one run per weak method and K, the reference once). UserError when it cannot start."""
    return start_run(session, dataset_path, plan.methods, image_size=image_size, backbone=backbone, preset=preset,
                     labeled_anomalies=list(plan.ks))
