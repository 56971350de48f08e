"""Data page: choose the bundled sample, upload a zip or open a server folder; counts, thumbnails with masks,
dataset health."""

from __future__ import annotations

import streamlit as st

from dashboard import nav, services
from dashboard.views.images import overlay_mask
from dashboard.views.plots import size_figure

st.title("Data")
top_l, top_r = st.columns([4, 1])
top_l.caption("Step 1 of 3 — choose what to inspect. The bundled sample is ready: you can go straight to **Train**.")
if top_r.button("Next: Train →", type="primary", key="to_train_top"):
    nav.go("train")

cats = services.sample_categories()
current = st.session_state["dataset_path"]
col_a, col_b = st.columns([1, 1], gap="large")
with col_a:
    st.subheader("Sample data")
    names = [*cats]
    cur_cat = next((c for c in cats if services.sample_path(c) == current), None)
    choice = st.radio("Sample category", names, index=names.index(cur_cat) if cur_cat else 0, horizontal=True,
                      key="sample_choice", help="Small textures with drawn defects and exact masks (128 px).")
    if cur_cat is not None and choice != cur_cat or cur_cat is None and st.button("Use this sample category"):
        st.session_state["dataset_path"] = services.sample_path(choice)
        st.rerun()
with col_b:
    st.subheader("Your own images")
    st.caption(services.upload_limits_text())
    st.caption("Inside the zip: MVTec layout (`train/good`, `test/good`, `test/<defect>`, optional "
               "`ground_truth/<defect>/<name>_mask.png`) or folder layout (`good/` plus one folder per defect).")
    up = st.file_uploader("Upload a .zip", type=["zip"], key="upload")
    if up is not None and st.session_state.get("_uploaded_id") != up.file_id:
        st.session_state["_uploaded_id"] = up.file_id
        with st.spinner("Checking every file…"):
            try:
                info = services.save_upload(up.name, up.getvalue())
            except services.DataProblems as e:
                st.session_state["upload_problems"] = (up.name, e.problems)
            except services.UserError as e:
                st.session_state["upload_problems"] = (up.name, [(up.name, str(e), "")])
            else:
                st.session_state.pop("upload_problems", None)
                st.session_state["dataset_path"] = info.path
                st.rerun()

    st.subheader("Server folders")
    roots = services.server_roots()
    if not roots:
        st.caption("Datasets already on this server (often too large to upload) can be opened in place: start adlab "
                   "with `ADLAB_DATA_ROOTS=/data/lines:/mnt/shared`.")
    else:
        st.caption(f"Read-only, from {', '.join(f'`{r}`' for r in roots)}; validated like an upload.")
        found = services.server_datasets()
        labels = {d["path"]: d["label"] for d in found}
        s1, s2 = st.columns([3, 1])
        pick = s1.selectbox("Dataset on the server", list(labels), format_func=labels.get, key="server_choice",
                            placeholder="no dataset folder found under the roots" if not found else "choose one",
                            index=None)
        typed = s1.text_input("or a folder under a root", key="server_path",
                              placeholder="e.g. line1/metal_plate (relative to a root) or its full path")
        if s2.button("Open", key="server_open", disabled=not (pick or typed)):
            with st.spinner("Checking every file…"):
                try:
                    opened = services.open_server_dataset(typed.strip() or pick)
                except services.DataProblems as e:
                    st.session_state["upload_problems"] = (typed.strip() or labels.get(pick, pick), e.problems)
                except services.UserError as e:
                    st.session_state["upload_problems"] = (typed or pick, [(typed or pick, str(e), "")])
                else:
                    st.session_state.pop("upload_problems", None)
                    st.session_state["dataset_path"] = opened.path
                    st.rerun()
    if "upload_problems" in st.session_state:
        name, problems = st.session_state["upload_problems"]
        st.error(f"{name} was not loaded: {len(problems)} problem(s). Your current dataset and results are "
                 "unchanged.")
        st.dataframe([{"file": p, "problem": m, "what to do": h} for p, m, h in problems], hide_index=True,
                     width="stretch")

info = services.dataset_info(st.session_state["dataset_path"])
st.divider()
st.subheader(f"{info.name}" + (" · sample" if info.is_sample else " · server folder (read-only)" if info.is_server
                               else " · uploaded"))
m1, m2, m3, m4 = st.columns(4)
m1.metric("Training images (good)", info.n_train)
m2.metric("Test images", info.n_test)
m3.metric("Defect types", len(info.defect_types))
m4.metric("Masks", "yes" if info.has_masks else "none")
if info.warnings:
    for w in info.warnings:
        st.warning(w, icon=":material/warning:")
else:
    st.success("Dataset health: every file read, no problems found.", icon=":material/check_circle:")

left, right = st.columns([1, 2], gap="large")
with left:
    st.markdown("**Images per split and type**")
    st.dataframe(services.counts_table(info.path), hide_index=True, width="stretch")
with right:
    st.markdown("**Test images** (ground-truth defect regions outlined in green)")
    thumbs = services.thumbnails(info.path, per_type=4)
    st.image([overlay_mask(img, mask) for _, img, mask in thumbs], caption=[c for c, _, _ in thumbs], width=120)

st.markdown("**Image sizes**")
sz_l, sz_r = st.columns([2, 1], gap="large")
sz_l.info(info.size_advice[:1].upper() + info.size_advice[1:] + ".", icon=":material/aspect_ratio:")
sz_l.caption("Train keeps the aspect ratio by default (short side = the image size); tick “Tile large images” "
             "there to keep every native pixel of big images.")
sizes = services.image_sizes(info.path)
sz_r.plotly_chart(size_figure(sizes["width"], sizes["height"], sizes["split"]), key="size_plot")

st.divider()
if st.button("Next: train methods on this data →", type="primary", key="to_train"):
    nav.go("train")
