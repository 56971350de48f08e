"""Methods, one module each, grouped by the survey's families. Registered via engine.registry."""
