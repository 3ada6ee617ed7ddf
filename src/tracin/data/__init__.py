"""Data: loaders in fixed order, image folders, and the embedded demo data."""
from .loaders import DataSource, dataset_size, loader_from, make_loader

__all__ = ["DataSource", "dataset_size", "loader_from", "make_loader"]
