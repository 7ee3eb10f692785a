"""generators of anomaly-factory."""
