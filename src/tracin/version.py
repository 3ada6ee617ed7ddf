"""The package version (one place; ``tracin.__version__`` and ``tracin --version`` read it)."""
__version__ = "0.1.0"
