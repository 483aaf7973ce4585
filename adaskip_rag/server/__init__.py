"""adaskip-rag over HTTP (the 'server' extra): :func:`create_app` builds the OpenAI-compatible app over an engine,
``adaskip-rag serve`` runs it."""

from .app import create_app

__all__ = ["create_app"]
