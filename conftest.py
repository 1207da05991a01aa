"""Repository-level pytest configuration (doctest collection of the package)."""

import importlib.util

# The Triton kernel modules import triton at the top (the package imports them lazily); triton is
# an optional extra, so their doctest collection is skipped where it is not installed.
collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["fsinfo_fast/kernels/*.py"]
