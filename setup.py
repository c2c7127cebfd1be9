"""Package list for the root-as-package layout (see pyproject.toml)."""
from setuptools import find_packages, setup

_sub = find_packages(where=".", exclude=["tests", "tests.*", "deploy", "deploy.*", "build", "build.*"])
setup(packages=["splitserve"] + [f"splitserve.{p}" for p in _sub])
