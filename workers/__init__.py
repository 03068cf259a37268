"""adaptune workers: everything one trial needs, runnable without the sweep driver."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adaptune")  # pyproject.toml's, the one place the version is written
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
