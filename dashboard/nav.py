"""The app's pages as st.Page objects, so any page can link to another (st.switch_page / st.page_link)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"

# key -> (file, title, icon)
PAGE_SPECS: dict[str, tuple[str, str, str]] = {
    "data": ("data.py", "Data", ":material/folder_open:"),
    "train": ("train.py", "Train", ":material/model_training:"),
    "compare": ("compare.py", "Compare", ":material/leaderboard:"),
    "benchmark": ("benchmark.py", "Benchmark", ":material/stacked_bar_chart:"),
    "heatmaps": ("heatmaps.py", "Heatmaps", ":material/local_fire_department:"),
    "failures": ("failures.py", "Failures", ":material/report:"),
    "try": ("try.py", "Try", ":material/science:"),
    "learn": ("learn.py", "Learn", ":material/school:"),
}


def pages() -> dict[str, st.Page]:
    """A fresh st.Page per page key (Data is the default page)."""
    return {key: st.Page(PAGES_DIR / f, title=t, icon=i, default=key == "data", url_path=key)
            for key, (f, t, i) in PAGE_SPECS.items()}


def page(key: str) -> st.Page:
    """The st.Page of a key, for st.switch_page and st.page_link."""
    f, t, i = PAGE_SPECS[key]
    return st.Page(PAGES_DIR / f, title=t, icon=i, default=key == "data", url_path=key)


def go(key: str, **state: object) -> None:
    """Put `state` into session_state and switch to page `key` (used by buttons)."""
    for k, v in state.items():
        st.session_state[k] = v
    st.switch_page(page(key))


def stop_if_empty(has_results: bool) -> None:
    """On a results page with nothing trained yet: say so, offer Train, and stop the script."""
    if has_results:
        return
    st.info("No results yet for this dataset. Train a few methods first.")
    if st.button("Go to Train →", type="primary"):
        go("train")
    st.stop()
