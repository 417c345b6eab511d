"""The moetrace dashboard: a Streamlit app over traces, plans and runtime statistics.

``launch(traces, plans)`` starts it in a subprocess; ``moetrace dashboard`` is the CLI.
The app (``app.py``) and its pages (``views/``) read aggregates from ``data/``.
"""

from moetrace.dashboard.inputs import DashboardInputs
from moetrace.dashboard.launch import DashboardServer, free_port, launch

__all__ = ["DashboardInputs", "DashboardServer", "free_port", "launch"]
