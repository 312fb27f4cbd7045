"""The HTTP layer: an OpenAI-compatible FastAPI app over the async engine."""
