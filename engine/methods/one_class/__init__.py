"""One-class classification methods: normal data is mapped into a compact region of a feature space."""
