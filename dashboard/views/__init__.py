"""Pure figure and image functions of the dashboard: no Streamlit, no engine, only numpy / PIL / plotly."""
