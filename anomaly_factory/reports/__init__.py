"""Human-readable reports of generated versions."""

from __future__ import annotations

from anomaly_factory.reports.html import render_report

__all__ = ["render_report"]
