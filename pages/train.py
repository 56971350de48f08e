"""Train page: pick methods by family and options, run them in the background with live progress; "Is labelling
worth it?" runs the picked weakly supervised methods at several K beside the best unsupervised one."""

from __future__ import annotations

import streamlit as st

from dashboard import nav, services

sid = st.session_state["sid"]
info = services.dataset_info(st.session_state["dataset_path"])
fams = services.families()
by_family = services.methods_by_family()
all_names = [m["name"] for ms in by_family.values() for m in ms]

st.title("Train")
st.caption(f"Step 2 of 3 — on **{info.name}** ({info.n_train} good training images, {info.n_test} test images).")

# Checkbox values live in session_state (pick_<name>); "picked" survives page changes, which drop widget state.
if "picked" not in st.session_state:
    st.session_state["picked"] = services.default_methods(3)
for name in all_names:
    st.session_state.setdefault(f"pick_{name}", name in st.session_state["picked"])
picked = [n for n in all_names if st.session_state.get(f"pick_{n}")]
st.session_state["picked"] = picked
weak_picked = [m for m in picked if services.method_info(m)["supervision"] == "weak"]

with st.container(border=True):
    st.markdown("**Selected:** " + (", ".join(f"`{m}`" for m in picked) if picked else "nothing yet")
                + "  \n*Change the selection and the options below; fast memory-bank methods train in seconds, "
                  "methods that train a network take minutes on a CPU.*")
    labeled = 0
    if weak_picked:
        labeled = st.number_input("Labelled anomalies K (per defect type)", min_value=0, max_value=20, value=0,
                                  key="labeled_k",
                                  help="K defective test images of each type move into training for the weakly "
                                       "supervised methods, and are left out of every method's evaluation.")
    with st.expander("Options: image size, aspect ratio, tiling, backbone, preset"):
        o1, o2, o3 = st.columns(3)
        tile_on = o1.checkbox("Tile large images", value=False, key="tile_on",
                              help="Keep the images at their native resolution and cut them into overlapping "
                                   "square tiles: every method works on tiles, the maps are stitched back and an "
                                   "image's score is its worst tile's. For large images with small defects; "
                                   "slower (the estimate below counts the tiles).")
        tile = None
        if tile_on:
            tile = o1.select_slider("Tile size (px)", options=services.TILE_SIZES, value=256, key="tile_size")
            image_size = info.native_side
        else:
            image_size = o1.select_slider("Image size (px)", options=services.IMAGE_SIZES,
                                          value=services.default_image_size(info), key="image_size",
                                          help="The short side of the images (the long side follows their "
                                               "aspect ratio unless squashed to a square). Smaller is faster.")
        keep = o1.checkbox("Keep aspect ratio", value=True, key="keep_aspect", disabled=info.square,
                           help="Off: squash every image to a square (thin defects may shrink below a pixel). "
                                "Square images are unaffected.")
        resize = "keep-aspect" if keep else "square"
        backbone = o2.selectbox("Backbone (feature extractor)", services.BACKBONES, index=0, key="backbone",
                                help="Pretrained network whose features most methods build on.")
        o2.caption(f"Weights: {services.weights_source(backbone)}")
        preset = o3.radio("Preset", ["fast", "quality"], horizontal=True, key="preset",
                          help="fast: a 1% PatchCore coreset and a bounded number of training steps per method "
                               "(minutes on a CPU, whatever the dataset size); quality: about 4x the training "
                               "steps, EfficientAD at the paper's width and PatchCore's exact 10% coreset.")
        device = services.device_name()
        o3.caption(f"Device: {device}")
        if preset == "quality" and not device.lower().startswith("cuda"):
            o3.caption(":orange[On a CPU, quality can take an hour per trained method on a few hundred images "
                       "(EfficientAD: about an hour on 41).]")
    problem = services.check_config(picked, int(labeled))
    too_big = None
    if problem is None:
        try:
            estimate, too_big = services.run_estimate(info.path, picked, image_size=image_size, backbone=backbone,
                                                      preset=preset, labeled_anomalies=int(labeled), resize=resize,
                                                      tile=tile)
            st.markdown(estimate)
        except services.UserError as e:
            too_big = str(e)
    job = services.job_manager().get(sid)
    running = job is not None and job.active
    b1, b2, b3, _ = st.columns([1.3, 1, 1.6, 1.4])
    if b1.button(f"Train {len(picked)} method(s)", type="primary",
                 disabled=running or problem is not None or too_big is not None,
                 key="train_button", icon=":material/play_arrow:"):
        try:
            services.start_run(sid, info.path, picked, image_size=image_size, backbone=backbone, preset=preset,
                               labeled_anomalies=int(labeled), resize=resize, tile=tile)
        except services.UserError as e:
            st.error(str(e))
        else:
            st.rerun()
    if running and b2.button("Cancel", key="cancel_button", icon=":material/stop:"):
        services.job_manager().cancel(sid)
        st.rerun()
    if weak_picked:
        plan = services.curve_plan(info.path, picked, services.latest_results(info.digest))
        ref = f" and `{plan.reference}` once as the unsupervised reference" if plan.reference else ""
        if b3.button("Is labelling worth it?", key="curve_button", icon=":material/show_chart:",
                     disabled=running or plan.problem is not None,
                     help=f"Runs {', '.join(f'`{m}`' for m in plan.weak)} at K = "
                          f"{', '.join(map(str, plan.ks))} labelled defects per type{ref}, all scored on the same "
                          "test images; Compare then draws AUROC against K."):
            try:
                services.start_curve(sid, info.path, plan, image_size=image_size, backbone=backbone, preset=preset)
            except services.UserError as e:
                st.error(str(e))
            else:
                st.rerun()
        if plan.problem and not running:
            st.caption(f":orange[{plan.problem}]")
        elif plan.note and not running:
            st.caption(f"Is labelling worth it? K = {', '.join(map(str, plan.ks))}: {plan.note}.")
    if problem and not running:
        st.warning(problem)
    if too_big and not running:
        st.error(too_big, icon=":material/memory:")

other = services.job_manager().active_for_dataset(info.digest)
if not running and other is not None:
    st.info("Another tab or user is training on this dataset; its results appear on Compare as they finish.")


def _show(view: dict) -> None:
    """Progress bars, finished results and errors of a job."""
    if view["state"] == "queued":
        st.info(f"Waiting for a free training slot — position {view['queue_position']} in the queue.",
                icon=":material/schedule:")
    if view["cancelling"]:
        st.info("Cancelling: the method stops at its next step (finished methods are kept).")
    for row in view["rows"]:
        if row["status"] == "failed":
            st.error(f"**{row['method']}** failed: {row['error']}", icon=":material/error:")
        elif row["status"] == "ok":
            extra = " (from cache)" if row["cached"] else ""
            auroc = "n/a" if row["auroc"] is None else f"{row['auroc']:.3f}"
            st.success(f"**{row['method']}** done{extra} — image AUROC {auroc}", icon=":material/check:")
            if "WARNING" in row["notes"]:
                st.warning(f"**{row['method']}**: {row['notes']}", icon=":material/warning:")
            elif row["notes"]:
                st.caption(f"{row['method']}: {row['notes']}")
        else:
            st.progress(row["fraction"], text=f"**{row['method']}** — {row['label']}")
    if view["state"] == "failed":
        st.error(view["error"] or "the run failed")
    elif view["state"] == "cancelled":
        st.warning("Run cancelled. Methods that had finished are kept.")
    if view.get("ray"):
        st.caption(f"Handed to the Ray cluster at `{view['ray']}` (ADLAB_RAY_ADDRESS): it trains on a free node, "
                   "beside other people's jobs.")
    w = view["worker"]
    if w and w["pid"] and view["state"] not in ("queued", "running"):
        peak = f"peak memory {w['peak_mb']:.0f} MB" if w["peak_mb"] else "peak memory not known"
        st.caption(f"Trained in a separate process (`adlab-worker`, pid {w['pid']}): {peak}.")
    elif w and w["pid"]:
        st.caption(f"Training in a separate process (`adlab-worker`, pid {w['pid']}).")


has_results = bool(services.ok_runs(services.latest_results(info.digest)))
if job is not None:
    @st.fragment(run_every=1.0 if job.active else None)
    def _progress() -> None:
        view = services.job_view(job)
        _show(view)
        if view["state"] in ("done", "failed", "cancelled") and st.session_state.get("_job_seen") != job.id:
            st.session_state["_job_seen"] = job.id
            st.rerun(scope="app")

    _progress()
if has_results and not running:
    if st.button("Next: compare the results →", type="primary", key="to_compare"):
        nav.go("compare")

st.subheader("Methods")
cols = st.columns(2, gap="large")
for i, (fam, methods) in enumerate(by_family.items()):
    with cols[i % 2].container(border=True):
        st.markdown(f"**{fams.get(fam, fam)}**")
        for m in methods:
            badges = []
            if not m["faithful"]:
                badges.append(":orange-badge[not yet faithful]")
            if preset in m.get("reduced_presets", ()):
                badges.append(f":gray-badge[reduced in {preset}]")
            if not m["localises"]:
                badges.append(":gray-badge[no pixel map]")
            if m["supervision"] == "weak":
                badges.append(":violet-badge[needs labelled defects]")
            if m["trained"]:
                badges.append(":blue-badge[trains a network]")
            st.checkbox(f"`{m['name']}` " + " ".join(badges), key=f"pick_{m['name']}", help=m.get("notes") or None)
            st.caption(f"{m['summary']} — *{m['paper']}*")
