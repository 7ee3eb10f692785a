"""anomaly-factory: synthetic, versioned, quality-gated anomaly datasets."""

from __future__ import annotations

__version__ = "0.1.0"
