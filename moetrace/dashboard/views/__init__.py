"""One module per dashboard page; each is run by Streamlit as a script (``render``)."""
