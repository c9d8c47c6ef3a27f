"""Training data: user datasets (image folder, parquet, manifest), the lab, dedup."""
