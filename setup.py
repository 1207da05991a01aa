"""Build script. Metadata lives in pyproject.toml.

The compiled extension (csrc/) is optional: it is added here only when its sources exist, and a
failed build never fails the install (the package then runs on its pure-PyTorch paths).
"""

from setuptools import setup

setup()
