"""GAN family: adversarially trained reconstruction models."""
