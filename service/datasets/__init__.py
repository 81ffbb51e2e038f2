"""Datasets: built-in generators and the ingest of uploaded archives."""
