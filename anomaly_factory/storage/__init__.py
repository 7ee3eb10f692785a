"""storage of anomaly-factory."""
