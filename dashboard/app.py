"""adlab dashboard entry point: `streamlit run dashboard/app.py` (or `make run`, `adlab dashboard`)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from dashboard import nav, services  # noqa: E402


def _init_state() -> None:
    """Per-session defaults: a session id for the job manager and the bundled sample as the dataset."""
    st.session_state.setdefault("sid", uuid.uuid4().hex)
    if "dataset_path" not in st.session_state:
        st.session_state["dataset_path"] = services.default_dataset_path()


def _sidebar() -> None:
    """Current dataset, run status and the next step, on every page."""
    with st.sidebar:
        try:
            info = services.dataset_info(st.session_state["dataset_path"])
        except services.UserError:
            st.caption("No dataset loaded.")
            return
        st.markdown(f"**Dataset:** {info.name}" + (" (sample)" if info.is_sample else ""))
        st.caption(f"{info.n_train} train · {info.n_test} test · {len(info.defect_types)} defect types")
        job = services.job_manager().get(st.session_state["sid"])
        if job is not None and job.active:
            st.info("Training is running. See **Train**.", icon=":material/hourglass_top:")
        results = services.latest_results(info.digest)
        best = services.best_method(results)
        if best:
            n = len(services.ok_runs(results))
            st.caption(f"{n} trained method(s) · best image AUROC: **{best}**")
        else:
            st.caption("Nothing trained yet: start on **Train**.")


def main() -> None:
    """Configure the page, build the navigation and run the selected page, showing errors as messages."""
    st.set_page_config(page_title="adlab · anomaly detection lab", page_icon=":material/search_insights:",
                       layout="wide")
    try:
        _init_state()
    except services.UserError as e:
        st.error(str(e))
        st.stop()
    pg = st.navigation(list(nav.pages().values()))
    _sidebar()
    try:
        pg.run()
    except services.DataProblems as e:
        st.error(str(e))
        for path, msg, hint in e.problems:
            st.markdown(f"- `{path}`: {msg}" + (f" — *{hint}*" if hint else ""))
    except services.UserError as e:
        st.error(str(e))
    except Exception as e:  # noqa: BLE001 - never a stack trace in the page
        st.error(f"Something went wrong: {type(e).__name__}: {e}")


main()
