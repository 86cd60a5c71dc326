"""Gradient rules for convolution, pooling and batch normalisation."""
