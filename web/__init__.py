"""The HTTP layer: the FastAPI app, the Ollama- and OpenAI-compatible APIs, authentication."""
