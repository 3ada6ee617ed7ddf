"""Measuring attribution quality: mislabel detection and data cleaning against baselines."""
