"""adapterhub_local: one frozen base model, many small task adapters, kept in a local registry."""

__version__ = "0.1.0"
