"""Weakly supervised methods: learn from normal images plus a few labelled anomalous images."""
