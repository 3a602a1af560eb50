"""Training: the local LightGBM trainer, chunked datasets, the Spark job, the SynapseML engine, Databricks run payloads."""
