"""Dataset ingestion, layouts, the leak-free split and the procedural demo set."""
