"""The adlab Streamlit dashboard: app.py (navigation), services/ (the only importer of engine), views/ (figures)."""
