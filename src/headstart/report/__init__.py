"""The run report: one self-contained HTML page with learning curves, confusion, mistakes and the plan."""

from headstart.report.core import read_run, write_report

__all__ = ["read_run", "write_report"]
