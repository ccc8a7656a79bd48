"""Data: Ray Data pre-training sources, labelled segmentation readers and the embedded mosaic."""
