"""MAGIC: few-shot mask-guided anomaly inpainting (arXiv 2507.02314)."""
