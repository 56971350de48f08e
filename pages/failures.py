"""Failures page: at a chosen threshold, each method's false alarms and missed defects, and where methods disagree."""

from __future__ import annotations

import streamlit as st

from dashboard import nav, services
from dashboard.views import plots
from dashboard.views.images import overlay_mask

info = services.dataset_info(st.session_state["dataset_path"])
results = services.latest_results(info.digest)

st.title("Failures")
runs = services.ok_runs(results)
nav.stop_if_empty(bool(runs))

st.caption("Which images does each method get wrong? A method flags an image when its score reaches the threshold.")
t1, t2 = st.columns([2, 3])
# widget values are copied to plain keys so that Heatmaps uses the same thresholds
modes = ["f1", "fpr"]
mode = t1.radio("Threshold", modes, index=modes.index(st.session_state.get("thr_mode", "f1")), format_func={
    "f1": "best F1 on this test set", "fpr": "flag at most N% of good images"}.get)
st.session_state["thr_mode"] = mode
if mode == "fpr":
    st.session_state["thr_fpr"] = t2.slider("N: largest share of good images flagged (%)", 0, 50,
                                            value=st.session_state.get("thr_fpr", 5))
thr = services.thresholds(results, mode, st.session_state.get("thr_fpr", 5) / 100)
st.dataframe(services.confusion_table(results, thr), hide_index=True, width="stretch",
             column_config={"threshold": st.column_config.NumberColumn(format="%.4g"),
                            "recall": st.column_config.NumberColumn(format="%.2f"),
                            "FPR": st.column_config.NumberColumn(format="%.2f")})

names = [services.run_name(r) for r in runs]
want = st.session_state.pop("failures_method", None) or services.best_method(results)
if want in names:
    st.session_state["failures_select"] = want
if st.session_state.get("failures_select") not in names:
    st.session_state["failures_select"] = names[0]
method = st.selectbox("Method", names, key="failures_select")
run = next(r for r in runs if services.run_name(r) == method)
st.plotly_chart(plots.score_figure([i["score"] for i in run["images"]], [i["label"] for i in run["images"]],
                                   thr.get(method), method), width="stretch", key="scores")


def _gallery(items: list[dict], kind: str, empty: str) -> None:
    """Thumbnails (mask outlined) with score, margin and a button opening the image on Heatmaps."""
    if not items:
        st.success(empty)
        return
    per_row = 6
    for start in range(0, len(items), per_row):
        cols = st.columns(per_row)
        for col, it in zip(cols, items[start:start + per_row], strict=False):
            img, mask = services.test_image(results, it["path"])
            col.image(overlay_mask(img, mask), width="stretch")
            col.caption(f"{it['name']} · {it['defect_type']}  \nscore {it['score']:.4g} · margin {it['margin']:.3g}")
            if col.button("Open in Heatmaps", key=f"{kind}-{method}-{it['path']}"):
                nav.go("heatmaps", heatmap_image=it["path"])


fps, fns = services.failures(results, method, thr.get(method))
st.subheader(f"Missed defects (false negatives) of {method}: {len(fns)}")
st.caption("Defective images scored below the threshold, the most confidently missed first.")
_gallery(fns, "fn", "No missed defects at this threshold.")
st.subheader(f"False alarms (false positives) of {method}: {len(fps)}")
st.caption("Good images scored above the threshold, the most confident first.")
_gallery(fps, "fp", "No false alarms at this threshold.")

st.subheader("Where the methods disagree")
dis = services.disagreements(results, thr)
if len(runs) < 2:
    st.info("Train at least two methods to see where they disagree.")
elif not dis:
    st.success("All methods agree on every test image at these thresholds.")
for k, d in enumerate(dis):
    c1, c2, c3 = st.columns([1, 4, 1])
    img, mask = services.test_image(results, d["path"])
    c1.image(overlay_mask(img, mask), width=96)
    truth = "good" if d["label"] == 0 else f"defect ({d['defect_type']})"
    # Say what each method did (flagged / passed) and whether that was right for this image.
    verdicts = " · ".join(f"{m}: {'flagged' if v else 'passed'} {'✓' if v == bool(d['label']) else '✗'}"
                          for m, v in d["verdicts"].items())
    c2.markdown(f"**{d['name']}** — truly {truth}; {d['n_wrong']} method(s) wrong  \n{verdicts}")
    if c3.button("Open in Heatmaps", key=f"dis-{k}-{d['path']}"):
        nav.go("heatmaps", heatmap_image=d["path"])
