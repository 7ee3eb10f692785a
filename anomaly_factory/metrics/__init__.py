"""metrics of anomaly-factory."""
