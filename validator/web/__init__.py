"""`validator serve`: the REST API, the dashboard, /metrics and the network's validator
endpoint (POST /validator/v1/llm), in one FastAPI app (validator.web.app.create_app)."""
