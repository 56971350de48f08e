"""Heatmaps page: one test image, its ground truth and every method's anomaly map side by side."""

from __future__ import annotations

import streamlit as st

from dashboard import nav, services

info = services.dataset_info(st.session_state["dataset_path"])
results = services.latest_results(info.digest)

st.title("Heatmaps")
images = services.test_images(results)
nav.stop_if_empty(bool(images))

st.caption("Bright = the method finds this region unusual. The green outline is the true defect.")
paths = [i["path"] for i in images]
labels = {i["path"]: f"{i['name']} — {'good' if i['label'] == 0 else 'defect: ' + i['defect_type']}" for i in images}
want = st.session_state.pop("heatmap_image", None)
if want in paths:
    st.session_state["heatmap_select"] = want
if st.session_state.get("heatmap_select") not in paths:
    st.session_state["heatmap_select"] = paths[0]
c1, c2, c3 = st.columns([3, 2, 2])
path = c1.selectbox("Test image", paths, format_func=labels.get, key="heatmap_select")
colour = c2.radio("Colour scale", ["per_method", "shared"], horizontal=True,
                  format_func={"per_method": "per method", "shared": "shared"}.get,
                  help="per method: each method's own range over all test images (scores of different methods "
                       "are on different scales); shared: one range for all.")
opacity = c3.slider("Map opacity", 0.0, 1.0, services.DEFAULT_OPACITY, 0.05)
fam_titles = services.families()
family = st.session_state.get("heatmap_family")
if family:
    f1, f2 = st.columns([4, 1])
    f1.info(f"Showing only the **{fam_titles.get(family, family)}** family.")
    if f2.button("Show all methods"):
        st.session_state.pop("heatmap_family", None)
        st.rerun()

mode = st.session_state.get("thr_mode", "f1")
max_fpr = st.session_state.get("thr_fpr", 5) / 100
thr = services.thresholds(results, mode, max_fpr)
data = services.heatmap_panels(results, path, colour=colour, opacity=opacity, family=family, thr=thr)
tiles = [("Image", data["image"], labels[path])]
tiles.append(("Ground truth", data["mask_overlay"] if data["has_mask"] else data["image"],
              "defect outlined" if data["has_mask"] else "no mask (good image or none given)"))
per_row = 5
cells = [*tiles, *[(p["method"], p, None) for p in data["panels"]]]
for start in range(0, len(cells), per_row):
    cols = st.columns(per_row)
    for col, (title, content, caption) in zip(cols, cells[start:start + per_row], strict=False):
        with col:
            st.markdown(f"**{title}**")
            if caption is not None:
                st.image(content, caption=caption, width="stretch")
                continue
            p = content
            if p["overlay"] is not None:
                st.image(p["overlay"], width="stretch")
            else:
                st.info(p["note"])
            if p["flagged"] is None:
                st.caption(f"score {p['score']:.4g} (no threshold)")
            else:
                verdict = "anomalous" if p["flagged"] else "normal"
                mark = ":green[(right)]" if p["correct"] else ":red[(wrong)]"
                st.caption(f"score {p['score']:.4g} · threshold {p['threshold']:.4g} → **{verdict}** {mark}")
st.image(data["colour_bar"], caption="colour scale: low → high anomaly", width=256)
st.caption("Thresholds: " + ("each method's F1-max threshold on this test set." if mode == "f1" else
           f"flag at most {max_fpr:.0%} of good images.") + " Change them on the Failures page.")
