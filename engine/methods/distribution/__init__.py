"""Distribution-map methods: normalizing flows over pretrained features (FastFlow, CFLOW-AD)."""
