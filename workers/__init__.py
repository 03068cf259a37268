"""adaptune workers: everything one trial needs, runnable without the sweep driver."""

__version__ = "0.1.0"
