"""Answering from passages: asking (the use case), the refusal gate, quotes and citations, conversations."""
