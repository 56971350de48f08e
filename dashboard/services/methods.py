"""Methods: the registry as the pages see it, the device, and run estimates for the Train page."""

from __future__ import annotations

from typing import Any

from dashboard.services.common import IMAGE_SIZES, UserError, _user_error
from dashboard.services.data import DataInfo, dataset_info, working_shape
from engine import estimates, registry
from engine.api import AdlabError
from engine.backbones import weights_description
from engine.device import resolve_device
from engine.runner import RunConfig, k_values, method_params, run_plan


def families() -> dict[str, str]:
    """Family key -> title, in the survey's order."""
    return dict(registry.FAMILIES)


def methods_by_family() -> dict[str, list[dict[str, Any]]]:
    """Registered methods grouped by family (only families with at least one method), each as a dict."""
    out: dict[str, list[dict[str, Any]]] = {}
    for m in registry.available():
        out.setdefault(m.family, []).append(m.to_dict())
    return out


def method_info(name: str) -> dict[str, Any]:
    """The registry entry of one method as a dict."""
    try:
        return registry.info(name).to_dict()
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None


def default_methods(n: int = 3) -> list[str]:
    """A quick first selection: up to n fast unsupervised methods (no gradient training), else the first ones."""
    ms = registry.available()
    fast = [m.name for m in ms if not m.trained and m.supervision == "none"]
    return (fast or [m.name for m in ms])[:n]


def weights_source(backbone: str) -> str:
    """Where the backbone's pretrained weights come from."""
    return weights_description(backbone, "auto")


def device_name() -> str:
    """The device `auto` resolves to here."""
    return resolve_device("auto")


def default_image_size(info: DataInfo) -> int:
    """The engine's default for this dataset (256, or the images' own size when smaller), as a slider option."""
    return max([s for s in IMAGE_SIZES if s <= info.working_size] or [IMAGE_SIZES[0]])


def check_config(methods: list[str], labeled_anomalies: int | list[int]) -> str | None:
    """A message when the selection cannot run (nothing picked, weakly supervised with K = 0 only), else None."""
    if not methods:
        return "Pick at least one method."
    try:
        top = max(k_values(labeled_anomalies))
    except AdlabError as e:
        return str(e)
    weak = [m for m in methods if method_info(m)["supervision"] == "weak"]
    if weak and top <= 0:
        return (f"{', '.join(weak)} learn from a few labelled defects: set “labelled anomalies K” to 1 or more "
                "(K defective test images per type move into training), or unselect them.")
    return None


def estimate_run(dataset_path: str, cfg: RunConfig, workers: int = 1) -> estimates.JobEstimate:
    """Expected time and peak memory of running `cfg` on the dataset, from earlier runs on this machine;
    `workers` > 1: its methods that many at once (engine.parallel)."""
    info = dataset_info(dataset_path)
    shape = working_shape(dataset_path, cfg.image_size, cfg.resize, cfg.tile)
    try:
        # one entry per run: a weakly supervised method runs once per K of a labelled-anomaly curve
        methods = [(m, method_params(m, cfg), bool(registry.info(m).trained)) for m, k in run_plan(cfg)
                   if k is None or k > 0]  # a weak method at K = 0 fails at once: nothing to estimate
        return estimates.estimate_job(methods, n_train=info.n_train, n_test=info.n_test, image_size=min(shape),
                                      preset=cfg.preset, device=resolve_device(cfg.device), shape=shape,
                                      tile=cfg.tile, overlap=cfg.tile_overlap, workers=workers)
    except (AdlabError, ValueError) as e:
        raise UserError(str(e)) from None


def estimate_text(est: estimates.JobEstimate) -> str:
    """The estimate in one line for the Train page: time (per method when several), peak memory against the limit."""
    measured = [m for m in est.methods if m.measured]
    unmeasured = ", ".join(f"`{m}`" for m in est.unmeasured)
    if not measured:
        line = f"**Time:** not measured on this machine yet for {unmeasured} (the first run measures it)"
    else:
        per = ", ".join(f"`{m.method}` {estimates.duration_text(m.seconds)}" for m in measured)
        line = f"**Estimated time {estimates.duration_text(est.seconds)}**" + (
            f" ({per})" if len(measured) > 1 else f" for `{measured[0].method}`")
        if unmeasured:
            line += f", plus {unmeasured}: not measured on this machine yet (the first run measures it)"
    return (line + f" · peak memory ≈ {estimates.gb_text(est.peak_mb)} of the {estimates.gb_text(est.limit_mb)} "
            "a job may use · *from earlier runs here, roughly.*")
