"""The adlab Streamlit dashboard: app.py (navigation), services.py (the only importer of engine), views/ (figures)."""
