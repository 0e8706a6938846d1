"""Reading a run directory: verdict rules (claims), the Markdown/HTML report and its plots."""

from tapioca.report.report import build_report, load_results, write_report

__all__ = ["build_report", "load_results", "write_report"]
