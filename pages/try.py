"""Try page: drop new images; every method trained on the current dataset scores them and shows its heatmap with
the verdict at the threshold chosen on Failures; "Download model" gives one method's saved model."""

from __future__ import annotations

import streamlit as st

from dashboard import nav, services
from dashboard.services import try_images as services_try

info = services.dataset_info(st.session_state["dataset_path"])
results = services.latest_results(info.digest)

st.title("Try")
runs = services.ok_runs(results)
nav.stop_if_empty(bool(runs))

mode = st.session_state.get("thr_mode", "f1")
pct = st.session_state.get("thr_fpr", 5)
thr = services.thresholds(results, mode, pct / 100)
rule = "best F1 on the test set" if mode == "f1" else f"at most {pct}% of good test images flagged"
c1, c2 = st.columns([4, 1])
c1.caption(f"Score new images of **{info.name}** with every trained method. Each verdict uses the threshold "
           f"chosen on **Failures** ({rule}): an image is flagged when its score reaches it.")
if c2.button("Change the threshold", key="try_to_failures"):
    nav.go("failures")

ups = st.file_uploader("Images to score (PNG, JPEG, BMP, TIFF, or a .zip of images)", type=services_try.IMAGE_TYPES,
                       accept_multiple_files=True, key="try_upload")
if ups:
    ids = tuple(u.file_id for u in ups)
    if st.session_state.get("_try_ids") != ids:
        st.session_state["_try_ids"] = ids
        with st.spinner("Checking every file…"):
            try:
                st.session_state["try_images"] = services_try.save_images([(u.name, u.getvalue()) for u in ups])
                st.session_state.pop("try_problems", None)
            except services.DataProblems as e:
                st.session_state["try_problems"] = e.problems
                st.session_state.pop("try_images", None)
            except services.UserError as e:
                st.session_state["try_problems"] = [("", str(e), "")]
                st.session_state.pop("try_images", None)
if "try_problems" in st.session_state:
    problems = st.session_state["try_problems"]
    st.error(f"Nothing was scored: {len(problems)} problem(s) with the dropped files.")
    st.dataframe([{"file": p, "problem": m, "what to do": h} for p, m, h in problems], hide_index=True,
                 width="stretch")

images = st.session_state.get("try_images") or []
if not images and "try_problems" not in st.session_state:
    st.info("Drop one or more images above: each trained method scores them, side by side.",
            icon=":material/upload:")
if images:
    opacity = st.slider("Map opacity", 0.0, 1.0, services.DEFAULT_OPACITY, 0.05, key="try_opacity")
    with st.spinner("Scoring…"):
        data = services_try.try_images(results, images, thr, opacity)
    for method, why in data["missing"].items():
        st.warning(f"**{method}**: {why}", icon=":material/warning:")
    st.subheader("Verdicts")
    st.dataframe(data["table"], hide_index=True, width="stretch", key="try_table")
    if len(images) > len(data["images"]):
        st.caption(f"Heatmaps of the first {len(data['images'])} of {len(images)} images; the table lists all.")
    for item in data["images"]:
        st.markdown(f"**{item['name']}**")
        cells = [("Image", item["image"], None), *[(p["method"], None, p) for p in item["panels"]]]
        per_row = 5
        for start in range(0, len(cells), per_row):
            cols = st.columns(per_row)
            for col, (title, image, p) in zip(cols, cells[start:start + per_row], strict=False):
                with col:
                    st.markdown(f"*{title}*")
                    if p is None:
                        st.image(image, width="stretch")
                        continue
                    if p["overlay"] is not None:
                        st.image(p["overlay"], width="stretch")
                    else:
                        st.caption(p["note"])
                    t = "—" if p["threshold"] is None else f"{p['threshold']:.4g}"
                    if p["flagged"] is None:
                        st.caption(f"score {p['score']:.4g} · no threshold")
                    elif p["flagged"]:
                        st.markdown(f":red-badge[ANOMALOUS] score {p['score']:.4g} ≥ {t}")
                    else:
                        st.markdown(f":green-badge[normal] score {p['score']:.4g} < {t}")

st.divider()
st.subheader("Download a model")
st.caption("The fitted method with its thresholds (tensors + JSON, no pickle). Score images with it anywhere: "
           "`adlab predict adlab-model-NAME.zip IMAGES... --threshold f1 --out OUT`.")
names = [services.run_name(r) for r in runs if services_try.has_model(results, services.run_name(r))]
if not names:
    st.info("No trained method kept its model yet: train on **Train** to get one.")
else:
    d1, d2 = st.columns([2, 3])
    method = d1.selectbox("Method", names, key="try_download_method")
    d2.download_button("Download model", data=lambda: services_try.model_zip(results, method),
                       file_name=f"adlab-model-{method}.zip", mime="application/zip", key="download_model",
                       icon=":material/download:")
