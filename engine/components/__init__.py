"""Shared building blocks used by the methods: features, coreset, kNN, Gaussians, flows, maps, training."""
