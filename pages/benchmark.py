"""Benchmark page: a sweep (datasets × methods × seeds): mean ± std, average ranks with the seed noise, families."""

from __future__ import annotations

import streamlit as st

from dashboard import services
from dashboard.services import benchmark as bm
from dashboard.views import ranks as vr

st.title("Benchmark")
st.caption("One dataset and one seed rarely settle a choice. A sweep runs every method on several datasets with "
           "several seeds; here you see which differences hold up and which are within the seed-to-seed noise. "
           "Make one with `adlab sweep DATA... --methods ... --seeds 0,1,2 --out DIR` (locally or on Ray) and "
           "upload its sweep.json, or run a small one on the sample categories below.")

src_load, src_run = st.tabs(["Open a sweep", "Run one on the sample data"])
with src_load:
    up = st.file_uploader("sweep.json", type=["json"], key="sweep_upload",
                          help="The OUT/sweep.json that `adlab sweep` wrote.")
    # open a choice once, when it changes, so a later run or another choice is not overwritten on every rerun
    if up is not None and st.session_state.get("sweep_opened") != up.file_id:
        st.session_state["sweep_doc"] = bm.parse_upload(up.getvalue())
        st.session_state["sweep_opened"] = up.file_id
    saved = bm.saved_sweeps()
    if saved:
        labels = {s["id"]: s["label"] for s in saved}
        pick = st.selectbox("Or a sweep run from this page", list(labels), format_func=labels.get, index=None,
                            key="sweep_pick", placeholder="choose a sweep")
        if pick and st.session_state.get("sweep_opened") != pick:
            st.session_state["sweep_doc"] = bm.load(pick)
            st.session_state["sweep_opened"] = pick
with src_run:
    cats = services.sample_categories()
    names = [m["name"] for ms in services.methods_by_family().values() for m in ms
             if m["supervision"] != "weak"]
    c1, c2, c3 = st.columns([3, 1, 1])
    methods = c1.multiselect("Methods", names, default=[m for m in bm.DEFAULT_METHODS if m in names],
                             key="sweep_methods", help="Memory-bank methods take seconds; trained ones minutes.")
    n_seeds = c2.number_input("Seeds", min_value=1, max_value=5, value=2, key="sweep_seeds")
    size = c3.select_slider("Image size", options=[64, 96, 128], value=64, key="sweep_size")
    st.caption(f"{len(cats)} sample categories ({', '.join(cats)}) × {len(methods)} method(s) × {n_seeds} seed(s) "
               f"= {len(cats) * len(methods) * int(n_seeds)} units, one at a time in this server; units already "
               "done return at once.")
    if st.button("Run sweep", type="primary", disabled=not methods, key="sweep_run", icon=":material/play_arrow:"):
        bar = st.progress(0.0, text="starting")

        def show(p: bm.SweepProgress) -> None:
            bar.progress(p.done / max(1, p.total), text=p.line())

        st.session_state["sweep_doc"] = bm.run_sample_sweep(methods, list(range(int(n_seeds))), image_size=size,
                                                             progress=show)
        bar.empty()

doc = st.session_state.get("sweep_doc")
if not doc:
    st.info("No sweep open yet: upload a sweep.json or run one on the sample data.")
    st.stop()

cfg = doc.get("config", {})
units = doc["units"]
n_failed = sum(u["status"] != "ok" for u in units)
ex = doc.get("executor") or {}
st.caption(f"{len(units)} units · {len({u['dataset'] for u in units})} dataset(s) × "
           f"{len({u['method'] for u in units})} method(s) × {len({u['seed'] for u in units})} seed(s) · "
           f"preset {cfg.get('preset', '?')}, image size {cfg.get('image_size') or 'auto'} · executor "
           f"{ex.get('name', '?')}" + (f" · **{n_failed} failed**" if n_failed else "")
           + ("" if doc.get("complete", True) else " · :orange[incomplete: the sweep was interrupted]"))
metric = st.radio("Metric", list(bm.METRICS), format_func=bm.METRICS.get, horizontal=True, key="sweep_metric")

st.subheader(f"{bm.METRICS[metric]}: mean ± std over seeds")
st.dataframe(bm.table(doc, metric), hide_index=True, width="stretch")
for u in [u for u in units if u["status"] != "ok"][:10]:
    st.error(f"**{u['dataset']} · {u['method']} · seed {u['seed']}** failed: {u.get('error')}")

st.subheader("Ranks")
st.caption("On each dataset the methods are ranked by the metric's mean over seeds (1 = best); the average rank "
           "is over datasets. The bar spans the best and worst average rank over single seeds: methods whose bars "
           "overlap (a grey band, the same letter in *group*) are within the seed-to-seed noise of this sweep.")
chart = bm.rank_chart_data(doc, metric)
if chart["methods"]:
    st.plotly_chart(vr.rank_figure(**chart), width="stretch", key="rank_chart")
    st.dataframe(bm.ranks(doc, metric), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(c, format="%.2f")
                                for c in ("avg_rank", "seed_mean", "seed_min", "seed_max")})
else:
    st.info("No method finished on every dataset, so there is nothing to rank.")

st.subheader("By family")
st.dataframe(bm.family_summary(doc, metric), hide_index=True, width="stretch",
             column_config={f"mean {bm.METRICS[metric]}": st.column_config.NumberColumn(format="%.3f"),
                            "its average rank": st.column_config.NumberColumn(format="%.2f")})

d1, d2, d3, _ = st.columns([1, 1, 1.3, 2])
d1.download_button("Download CSV", bm.csv_bytes(doc, metric), file_name="sweep.csv", mime="text/csv")
d2.download_button("Download JSON", bm.json_bytes(doc), file_name="sweep.json", mime="application/json")
d3.download_button("Download report (HTML)", lambda: bm.report_html(doc), file_name="sweep-report.html",
                   mime="text/html",
                   help="One self-contained file that opens offline: tables, rank chart and, for sweeps run "
                        "here, each dataset's curves and worst misses.")
