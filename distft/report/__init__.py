"""Run report: PNG plots of a run dir's metrics and a one-page HTML summary (`distft-report`)."""

from distft.report.build import BackgroundReport, write_report

__all__ = ["BackgroundReport", "write_report"]
