"""Copy metrics (SSCD), alignment, memorization and detection scores."""
