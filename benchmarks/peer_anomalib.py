"""Run one anomalib model on one category with adlab's configuration; print `RESULT {json}`.

A yardstick, never a dependency: it runs in the peer's venv (`cd ../shared/peer && bash install.sh` makes
/tmp/venv-anomalib) and imports the peer's `offline_backbone` so timm's efficientnet_lite0 gets the same
bundled ImageNet weights as adlab. `peer_parity.py` calls it after the adlab run with the number of epochs
and the batch size that adlab's run took, so both sides train the same number of steps.

    /tmp/venv-anomalib/bin/python benchmarks/peer_anomalib.py --model stfpm --root /tmp/peer_view/metal_plate \
        --image-size 256 --epochs 10 --batch 8 [--coreset 0.1]

Models: patchcore, padim, stfpm, fastflow, cflow, draem, ganomaly (every one anomalib ships that runs offline
with the bundled weights; RD and EfficientAD need weights that cannot be had offline). Validation runs once,
after the last epoch (anomalib needs it for its score normalisation), not every epoch, so its fit time is not
inflated by test-set passes adlab does not make.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer"
sys.path.insert(0, str(PEER))
import offline_backbone  # noqa: E402,F401  (patches timm.create_model before any model is built)

warnings.filterwarnings("ignore")
import torch  # noqa: E402

LITE0 = "efficientnet_lite0"
LAYERS = {"patchcore": ["blocks.2", "blocks.4"], "padim": ["blocks.1", "blocks.2", "blocks.4"],
          "stfpm": ["blocks.1", "blocks.2", "blocks.4"], "cflow": ["blocks.1", "blocks.2", "blocks.4"]}


def texture_folder(path: Path) -> Path:
    """DRAEM's anomaly source: scikit-image's bundled photographs as JPEGs (DTD cannot be downloaded here)."""
    if not path.is_dir():
        from PIL import Image
        from skimage import data

        (path / "images").mkdir(parents=True)
        for name in ["astronaut", "coffee", "chelsea", "rocket", "cat", "coins", "camera", "hubble_deep_field",
                     "immunohistochemistry", "moon", "page", "text", "retina", "colorwheel", "motorcycle_left"]:
            try:
                Image.fromarray(getattr(data, name)()).convert("RGB").save(path / "images" / f"{name}.jpg")
            except Exception:  # noqa: BLE001  (a picture missing from this scikit-image: use the others)
                continue
    return path


def build(a: argparse.Namespace):
    import anomalib.models as M

    cls = {"patchcore": M.Patchcore, "padim": M.Padim, "stfpm": M.Stfpm, "fastflow": M.Fastflow,
           "cflow": M.Cflow, "draem": M.Draem, "ganomaly": M.Ganomaly}[a.model]
    kw = {"visualizer": False,
          "pre_processor": cls.configure_pre_processor(image_size=(a.image_size, a.image_size))}
    if a.model == "patchcore":
        return cls(backbone=LITE0, layers=LAYERS["patchcore"], coreset_sampling_ratio=a.coreset, num_neighbors=9, **kw)
    if a.model == "padim":
        return cls(backbone=LITE0, layers=LAYERS["padim"], n_features=a.n_features, **kw)
    if a.model == "stfpm":
        return cls(backbone=LITE0, layers=LAYERS["stfpm"], **kw)
    if a.model == "fastflow":
        # anomalib's FastFlow accepts only a few backbone names; its generic timm path (features_only, stages
        # 1-3) is the resnet18 branch, which for efficientnet_lite0 gives the strides-4/8/16 stages adlab uses.
        from anomalib.models.image.fastflow import torch_model as ff

        orig = ff.timm.create_model
        ff.timm.create_model = lambda name, **k: orig(LITE0 if name == "resnet18" else name, **k)
        return cls(backbone="resnet18", flow_steps=a.flow_steps, **kw)
    if a.model == "cflow":
        return cls(backbone=LITE0, layers=LAYERS["cflow"], coupling_blocks=a.coupling_blocks,
                   condition_vector=a.condition_vector, **kw)
    if a.model == "draem":
        return cls(dtd_dir=texture_folder(Path("/tmp/peer_textures")), **kw)
    return cls(batch_size=a.batch, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--root", required=True, help="a Folder view made by the peer's folder_view.py")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--coreset", type=float, default=0.1)
    ap.add_argument("--n-features", type=int, default=None)
    ap.add_argument("--flow-steps", type=int, default=8)
    ap.add_argument("--coupling-blocks", type=int, default=8)
    ap.add_argument("--condition-vector", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/peer_runs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from anomalib.data import Folder
    from anomalib.engine import Engine

    root = Path(a.root)
    dm = Folder(name=root.name, root=root, normal_dir="train/good", abnormal_dir="test/defect",
                normal_test_dir="test/good", mask_dir="ground_truth/defect", train_batch_size=a.batch,
                eval_batch_size=8, num_workers=0, val_split_mode="same_as_test", seed=0)
    dm.setup()
    model = build(a)
    epochs = max(1, a.epochs)
    engine = Engine(default_root_dir=f"{a.workdir}/{a.model}_{root.name}", logger=False, accelerator="cpu",
                    devices=1, max_epochs=epochs, check_val_every_n_epoch=epochs, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    t = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    res = engine.test(model=model, datamodule=dm, verbose=False)
    test_s = time.perf_counter() - t
    m = res[0] if res else {}
    out = {"model": a.model, "category": root.name, "image_size": a.image_size, "epochs": epochs, "batch": a.batch,
           "n_train": len(dm.train_data), "n_test": len(dm.test_data), "fit_s": round(fit_s, 1),
           "test_s": round(test_s, 1), "image_auroc": float(m.get("image_AUROC", float("nan"))),
           "pixel_auroc": float(m["pixel_AUROC"]) if "pixel_AUROC" in m else None,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "random_fallbacks": offline_backbone.RANDOM_FALLBACKS, "threads": a.threads,
           "loadavg": round(os.getloadavg()[0], 1)}
    print("RESULT", json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
