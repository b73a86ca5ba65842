"""certserve's HTTP layer: FastAPI app, error contract, settings, metrics, image decoding, uvicorn entry, client."""
