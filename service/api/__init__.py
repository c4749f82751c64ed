"""The HTTP API: `create_app(runtime)` (app.py); routes/ has a module per resource, deps.py the dependencies,
schemas.py the bodies, errors.py the error mapping."""

from vggt_cache.service.api.app import create_app

__all__ = ["create_app"]
