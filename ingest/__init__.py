"""Ingestion: turning files into chunks in the index (discovery, partitioning, chunking, jobs)."""
