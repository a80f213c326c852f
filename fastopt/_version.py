"""fastopt's version: one home, read by the package, its metadata (pyproject.toml) and
show_config."""

__version__ = "0.1.0"
