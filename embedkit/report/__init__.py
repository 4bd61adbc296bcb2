"""The comparison report: every run's metrics.json -> one self-contained HTML file.

>>> from embedkit.report import build_report
>>> path, ctx = build_report(["runs"], "reports/report.html")   # doctest: +SKIP
"""

from .build import ReportError, build_report, context, load, render

__all__ = ["ReportError", "build_report", "context", "load", "render"]
