"""A stable alias of the app factory (``uvicorn service.app:create_app --factory``); it lives in service.http.app."""

from .http.app import create_app

__all__ = ["create_app"]
