"""Reconstruction family: autoencoder, variational autoencoder, DRAEM, MemAE, skip-connection AE, DFR."""
