"""WSGI entry point: `gunicorn wsgi:app`. The app (and with it the runner) is created in the worker."""
import sys

from app import create_app
from app.backend import SetupError
from app.config import ConfigError

try:
    app = create_app()
except (ConfigError, SetupError) as exc:
    print(f"qwen-chat cannot start: {exc}", file=sys.stderr)
    sys.exit(4)  # gunicorn's "application failed to load": the master stops instead of respawning
