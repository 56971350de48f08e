"""Learn page: each family of methods explained, with its registered methods and the user's own numbers."""

from __future__ import annotations

import streamlit as st

from dashboard import content, nav, services
from dashboard.views.diagrams import family_diagram

info = services.dataset_info(st.session_state["dataset_path"])
results = services.latest_results(info.digest)
by_family = services.methods_by_family()

st.title("Learn")
st.markdown(content.INTRO)
titles = services.families()
st.markdown("Jump to: " + " · ".join(f"[{t}](#{k.replace('_', '-')})" for k, t in titles.items()))

for fam, title in titles.items():
    text = content.family_text(fam)
    st.header(title, anchor=fam.replace("_", "-"), divider="gray")
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.markdown(text.how)
        s1, s2 = st.columns(2)
        s1.markdown("**Strengths**\n" + "\n".join(f"- {s}" for s in text.strengths))
        s2.markdown("**Typical failure modes**\n" + "\n".join(f"- {s}" for s in text.failures))
        st.markdown(f"**Localises defects?** {text.localisation}")
    with right:
        st.graphviz_chart(family_diagram(fam), width="stretch")
    methods = by_family.get(fam, [])
    if methods:
        st.markdown("**Methods in this lab:** " + "; ".join(
            f"`{m['name']}` ({m['paper']})" + ("" if m["localises"] else " — no pixel map")
            + ("" if m["faithful"] else " — not yet faithful") for m in methods))
    else:
        st.caption("No method of this family is implemented in this lab yet.")
    own = services.family_results(results, fam)
    if not own.empty:
        st.markdown("**On your data** (" + info.name + "):")
        st.dataframe(own, hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.3f")
                                    for c in ("image AUROC", "pixel AUROC", "AUPRO")})
        if st.button(f"See {title} heatmaps", key=f"learn-heat-{fam}"):
            nav.go("heatmaps", heatmap_family=fam)
    elif methods:
        st.caption("Train one of these methods to see its numbers on your data here.")
