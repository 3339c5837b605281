"""HTTP: the app (create_app, lifespan, gatekeeper), the launcher, dependencies, the OpenAPI document,
metrics, problem handlers and the routes.

May import every other part of ``service`` and ``wire``.
"""
