"""Output sinks: Parquet, Label Studio, training-data exports, previews."""
