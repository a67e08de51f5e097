"""adapterhub_local: one frozen base model, many small task adapters, kept in a local registry."""

from adapterhub_local.runtime import prepare_openmp_env as _prepare_openmp_env

# Before anything imports torch: OpenMP reads its waiting policy once, at load (see runtime.py).
_prepare_openmp_env()

__version__ = "0.1.0"
