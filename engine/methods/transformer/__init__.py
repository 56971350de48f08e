"""Transformer family: attention-based feature reconstruction."""
