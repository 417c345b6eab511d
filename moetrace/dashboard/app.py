"""The moetrace dashboard (Streamlit multipage app).

Run it with ``moetrace dashboard TRACE... [--plan PLAN...] [--stats STATS...]``, or
``streamlit run moetrace/dashboard/app.py -- --trace TRACE [--plan PLAN]``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from moetrace.dashboard.context import sidebar

VIEWS = Path(__file__).resolve().parent / "views"
PAGES = (
    ("overview.py", "Overview", "overview", ":material/dashboard:"),
    ("experts.py", "Experts", "experts", ":material/grid_on:"),
    ("reuse.py", "Skew and reuse", "reuse", ":material/stacked_line_chart:"),
    ("groups.py", "Groups", "groups", ":material/hub:"),
    ("requests.py", "Requests", "requests", ":material/scatter_plot:"),
    ("plans.py", "Plans", "plans", ":material/tune:"),
)


def main() -> None:
    st.set_page_config(
        page_title="moetrace dashboard", page_icon=":material/memory:", layout="wide"
    )
    pages = [
        st.Page(str(VIEWS / file), title=title, url_path=url, icon=icon, default=(i == 0))
        for i, (file, title, url, icon) in enumerate(PAGES)
    ]
    page = st.navigation(pages)
    sidebar()
    page.run()


main()
