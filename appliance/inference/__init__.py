"""Inference: runner processes (llama-cpp-python), the scheduler, hardware detection, embeddings."""
