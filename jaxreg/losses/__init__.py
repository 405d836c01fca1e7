"""Losses: similarities of two images and regularizers of a transform, as factories."""
