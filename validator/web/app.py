"""The FastAPI app of `validator serve`. The server reads the store and wires stages
together: data flows probes -> client -> store -> scoring -> reputation elsewhere; here
only admin actions and feedback write (through the store and validator.reputation)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry

from validator import __version__
from validator.service.config import ServeConfig
from validator.models.registry import Registry
from validator.reputation import ReputationConfig
from validator.store import Store
from validator.web import api, dashboard, llm_endpoint, metrics
from validator.service.operations import Service
from validator.service.reads import finite
from validator.service.scorer import ModelUnavailable, Scorer
from validator.web.limits import LOGIN_PATH, BodyLimits, ModelTimeLimiter

DESCRIPTION = """\
The referee of a decentralised LLM network: hosts, their reputations and the evidence
behind every verdict; feedback and host administration; the network's validator
endpoint (`POST /validator/v1/llm`). Send `Authorization: Bearer <token>` (tokens come
from `validator tokens create --role admin|reader`): reads need any token unless the
config makes them public, writes an admin token. The dashboard is at `/hosts`."""


@dataclass
class WebContext:
    store: Store
    config: ServeConfig
    registry: Registry
    service: Service
    metrics: CollectorRegistry
    limits: ModelTimeLimiter


def _unavailable(request: Request, exc: ModelUnavailable) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503)


def _invalid(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's 422, but safe for any input it echoes: a lone surrogate (valid in JSON
    escapes, not in UTF-8) is written as an escape and NaN as null, where the default
    handler fails with a 500."""
    body = {"detail": finite(jsonable_encoder(exc.errors()))}
    return Response(json.dumps(body, ensure_ascii=True), status_code=422, media_type="application/json")


def _swagger_assets() -> str:
    """The directory of Swagger UI's files inside the installed fastapi-offline package
    (located without importing it: only its files are used)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fastapi-offline is not installed: pip install 'validator[web]'")
    return str(Path(next(iter(spec.submodule_search_locations))) / "static")


def create_app(store: Store, config: ServeConfig | None = None, *, registry: Registry | None = None,
               reputation: ReputationConfig | None = None, models: dict | None = None) -> FastAPI:
    """The app over `store` (migrated to head by the caller). `models`: reference models
    already loaded (name -> ReferenceModel), shared instead of loading them again."""
    registry = registry or Registry.load()
    # /docs is served from Swagger UI's files in the fastapi-offline package (Swagger UI 5,
    # which reads OpenAPI 3.1), not a CDN: it works without internet access. (ReDoc is off.)
    app = FastAPI(title="validator", version=__version__, description=DESCRIPTION,
                  docs_url=None, redoc_url=None,
                  openapi_tags=[{"name": "hosts", "description": "Hosts, their standing and history."},
                                {"name": "probes", "description": "One probe and its evidence."},
                                {"name": "admin", "description": "Writes: admin tokens only."},
                                {"name": "validator", "description": "The network's validator API."},
                                {"name": "status", "description": "Service state and metrics."}])
    config = config or ServeConfig()
    service = Service(store, registry, reputation, Scorer(registry, models=models))
    app.state.web = WebContext(store=store, config=config, registry=registry, service=service,
                               metrics=metrics.registry_for(store),
                               limits=ModelTimeLimiter(config.model_calls_per_minute))
    app.add_middleware(BodyLimits, max_bytes=config.max_body_bytes,
                       per_path={LOGIN_PATH: config.max_login_bytes})
    app.add_exception_handler(ModelUnavailable, _unavailable)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.include_router(api.router)
    app.include_router(llm_endpoint.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).with_name("static"))), name="static")
    app.mount("/docs-assets", StaticFiles(directory=_swagger_assets()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="validator API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")

    return app
