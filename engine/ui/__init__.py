"""The web UI (``stepsource ui``, ``engine.ui_app()``): see ``app``."""

from stepsource.engine.ui.app import create_app

__all__ = ["create_app"]
