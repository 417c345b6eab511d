"""Text tiles: a label above a value that wraps instead of being cut off.

``st.metric`` truncates long values with an ellipsis (a model name such as
``meta-llama/Llama-4-Maverick-17B-128E-Instruct``, a trace path, a list of tags); these
tiles wrap anywhere, so the whole value is always readable.
"""

from __future__ import annotations

import html
from typing import Any


def text_tile(container: Any, label: str, value: str) -> None:
    """Show ``label`` (small) above ``value`` (wrapping anywhere) in ``container``."""
    container.markdown(
        f'<div style="font-size:0.875rem;opacity:0.75">{html.escape(label)}</div>'
        f'<div style="font-size:1.25rem;overflow-wrap:anywhere;line-height:1.3">'
        f"{html.escape(value)}</div>",
        unsafe_allow_html=True,
    )
