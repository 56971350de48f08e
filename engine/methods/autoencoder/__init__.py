"""Reconstruction family: autoencoder, variational autoencoder, DRAEM."""
