"""The documents a newcomer relies on say what the code and tests do."""
import re

from tests.helpers import PROJECT_DIR

PROTOCOL = PROJECT_DIR / "docs" / "PROTOCOL.md"


def test_every_test_the_protocol_cites_exists():
    cited = set(re.findall(r"`(?:[\w/.]+::)?(test_\w+)`", PROTOCOL.read_text()))
    assert cited, "docs/PROTOCOL.md cites tests"
    defined = {name for path in (PROJECT_DIR / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert cited <= defined, f"cited but not defined: {sorted(cited - defined)}"


def test_every_file_the_protocol_cites_exists():
    cited = set(re.findall(r"`((?:app|tests|scripts|docs)/[\w/.]+\.(?:py|md|log|sh))", PROTOCOL.read_text()))
    assert cited and all((PROJECT_DIR / path).is_file() for path in cited), \
        [path for path in cited if not (PROJECT_DIR / path).is_file()]


def test_the_code_cites_the_protocol_where_it_lives():
    for path in [*(PROJECT_DIR / "app").rglob("*.py"), *(PROJECT_DIR / "tests").glob("*.py")]:
        for line in path.read_text().splitlines():
            if "PROTOCOL.md" in line and path.name != "test_docs.py":
                assert "docs/PROTOCOL.md" in line, f"{path}: {line.strip()}"
