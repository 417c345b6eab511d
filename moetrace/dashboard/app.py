"""The moetrace dashboard (Streamlit multipage app).

Run it with ``moetrace dashboard TRACE... [--plan PLAN...] [--stats STATS...]``, or
``streamlit run moetrace/dashboard/app.py -- --trace TRACE [--plan PLAN]``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from moetrace.dashboard.context import sidebar

VIEWS = Path(__file__).resolve().parent / "views"
# The page icon, served by the dashboard itself (a ":material/...:" or emoji page icon makes
# the browser fetch it from an outside font / image service on every page). No docstrings
# at module level here: Streamlit's "magic" would print them on every page.
ICON = Path(__file__).resolve().parents[1] / "assets" / "dashboard" / "icon.png"
PAGES = (
    ("overview.py", "Overview", "overview", ":material/dashboard:"),
    ("experts.py", "Experts", "experts", ":material/grid_on:"),
    ("reuse.py", "Skew and reuse", "reuse", ":material/stacked_line_chart:"),
    ("groups.py", "Groups", "groups", ":material/hub:"),
    ("requests.py", "Requests", "requests", ":material/scatter_plot:"),
    ("plans.py", "Plans", "plans", ":material/tune:"),
    ("timeline.py", "Timeline", "timeline", ":material/view_timeline:"),
)


def main() -> None:
    st.set_page_config(page_title="moetrace dashboard", page_icon=str(ICON), layout="wide")
    pages = [
        st.Page(str(VIEWS / file), title=title, url_path=url, icon=icon, default=(i == 0))
        for i, (file, title, url, icon) in enumerate(PAGES)
    ]
    page = st.navigation(pages)
    sidebar()
    page.run()


main()
