"""Compare page: metrics table with intervals, the labelled-anomaly curve (several K), ROC / PR / pixel ROC curves,
per-defect table, accuracy vs speed."""

from __future__ import annotations

import streamlit as st

from dashboard import nav, services
from dashboard.services import report
from dashboard.views import plots

info = services.dataset_info(st.session_state["dataset_path"])
results = services.latest_results(info.digest)

st.title("Compare")
nav.stop_if_empty(bool(services.ok_runs(results) or (results or {}).get("runs")))

cfg = results.get("config", {})
ks = cfg.get("labeled_anomalies_ks")
k_text = (f", labelled anomalies K = {', '.join(map(str, ks))} (the images labelled for K = {max(ks)} are "
          "held back from every evaluation)" if ks else
          f", K = {cfg.get('labeled_anomalies')} labelled anomalies" if cfg.get("labeled_anomalies") else "")
st.caption(f"Step 3 of 3 — **{info.name}**, {services.geometry_text(cfg)}, backbone {cfg.get('backbone')}, "
           f"preset {cfg.get('preset')}, device {cfg.get('device')}" + k_text)

for w in results.get("dataset", {}).get("warnings", []):
    st.warning(w, icon=":material/warning:")

best = services.best_method(results)
if best:
    c1, c2, c3 = st.columns([3, 1.2, 1.2])
    best_auroc = next(r for r in services.ok_runs(results)
                      if services.run_name(r) == best)["metrics"]["image_auroc"]
    c1.success(f"Best image AUROC: **{best}** ({best_auroc:.3f}). See where it goes wrong →",
               icon=":material/emoji_events:")
    if c2.button(f"Failures of {best}", type="primary", key="best_failures"):
        nav.go("failures", failures_method=best)
    if c3.button("Heatmaps", key="best_heatmaps"):
        nav.go("heatmaps")

curve = services.labelled_curve(results)
if curve is not None:
    st.subheader("Is labelling worth it?")
    ref = curve["reference"]["image_auroc"]
    st.caption("Each weakly supervised method trained with K labelled defective images per type, all scored on "
               f"the same {curve['n_test']} test images (the images labelled for the largest K are left out of "
               "every evaluation). Bars: 95% bootstrap intervals over those images. "
               + (f"Dashed: **{ref['method']}**, the best unsupervised method of this run, which uses no labels."
                  if ref else "No unsupervised method ran: add one to see what the labels add."))
    c1, c2 = st.columns(2)
    c1.plotly_chart(plots.labelled_curve_figure(curve["ks"], curve["weak"], ref), width="stretch",
                    key="k_curve")
    if curve["has_pixel"]:
        c2.plotly_chart(plots.labelled_curve_figure(curve["ks"], curve["weak"], curve["reference"]["pixel_auroc"],
                                                    metric="pixel_auroc", y_title="pixel AUROC",
                                                    title="Pixel AUROC against labelled anomalies K"),
                        width="stretch", key="k_curve_pixel")
        c2.caption("Pixel AUROC has no interval (the bootstrap resamples image scores).")
    else:
        c2.info("No pixel AUROC: the dataset has no masks, or no method produced maps.")
    for method, points in curve["weak"].items():
        for p in points:
            if p["status"] != "ok":
                st.caption(f":orange[{method} at K = {p['k']}: {p['error']}]")

df = services.metrics_table(results)
st.subheader("Metrics")
st.caption("Click a column header to sort. AUROC 1.0 = every defective image scores above every good one; "
           "0.5 = chance. The interval is a 95% bootstrap over test images: overlapping intervals mean the "
           "test set is too small to tell the methods apart.")
num = {c: st.column_config.NumberColumn(c, format="%.3f") for c in
       ("image AUROC", "image AP", "F1-max", "pixel AUROC", "AUPRO")}
num["F1-max"] = st.column_config.NumberColumn(
    "F1-max", format="%.3f", help="Image-level F1 at the best threshold over all thresholds (chosen on these test "
                                  "images: an upper bound for a threshold set in advance)")
num.update({c: st.column_config.NumberColumn(c, format="%.2f") for c in ("fit s", "predict s", "images/s")})
num["peak MB"] = st.column_config.NumberColumn("peak MB", format="%.0f")
num["trained in"] = st.column_config.TextColumn(
    "trained in", help="The precision of the method's training steps: fp32, or mixed precision (bf16 / fp16) on "
                       "a GPU, and bf16 on CPUs that run it natively for the methods measured to lose nothing by "
                       "it; empty for methods without training")
st.dataframe(df, hide_index=True, width="stretch", column_config=num)
for _, row in df[df["status"].str.startswith("failed")].iterrows():
    st.error(f"**{row['method']}** failed: {row['error']}")
if "reduced" in df and df["reduced"].any():
    st.caption("reduced = True: the preset shrinks the paper's configuration (smaller networks, fewer steps or a "
               "lower resolution) to fit a CPU; the quality preset runs the paper's configuration.")
if (~df["faithful"]).any():
    st.caption("faithful = False: the implementation is simplified relative to its paper; treat its numbers "
               "as indicative.")
d1, d2, d3, _ = st.columns([1, 1, 1.2, 2])
d1.download_button("Download table (CSV)", services.csv_bytes(df), file_name=f"{info.name}-metrics.csv",
                   mime="text/csv")
d2.download_button("Download results.json", services.results_json(results), file_name="results.json",
                   mime="application/json")
d3.download_button("Download report (HTML)", lambda: report.download_bytes(report.results_report, results),
                   file_name=f"{info.name}-report.html", mime="text/html",
                   help="One self-contained file that opens offline: configuration, metrics with intervals, "
                        "curves, per-defect table, accuracy vs speed, and each method's worst misses.")

st.subheader("Curves")
g1, g2 = st.columns(2)
roc = [plots.Curve(m, x, y, a) for m, x, y, a in services.curves(results, "roc")]
pr = [plots.Curve(m, x, y, a) for m, x, y, a in services.curves(results, "pr")]
g1.plotly_chart(plots.roc_figure(roc), width="stretch", key="roc")
g2.plotly_chart(plots.pr_figure(pr, services.base_rate(results)), width="stretch", key="pr")
g3, g4 = st.columns(2)
pix = [plots.Curve(m, x, y, a) for m, x, y, a in services.curves(results, "pixel_roc")]
if pix:
    g3.plotly_chart(plots.roc_figure(pix, title="Pixel-level ROC", area_name="pixel AUROC"), width="stretch",
                    key="pixel_roc")
else:
    g3.info("No pixel-level ROC: no method produced maps, or the dataset has no masks.")
ms, xs, ys = services.speed_points(results)
if ms:
    g4.plotly_chart(plots.speed_accuracy_figure(ms, xs, ys), width="stretch", key="speed")

methods, types, vals = services.per_defect(results)
if types:
    st.subheader("Per defect type")
    st.caption("Image AUROC of each defect type against the good images: which kinds of defect each method misses.")
    st.plotly_chart(plots.per_defect_figure(methods, types, vals), width="stretch", key="per_defect")
