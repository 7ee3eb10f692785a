"""detectors of anomaly-factory."""
