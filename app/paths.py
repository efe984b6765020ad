"""Where the project's files are: the checkout, and its instance folder (settings, the built tokenizer)."""
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
INSTANCE_DIR = PROJECT_DIR / "instance"
