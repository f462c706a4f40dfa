"""The OpenAI-compatible server (FastAPI + uvicorn)."""
