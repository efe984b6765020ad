"""The documents a newcomer relies on say what the code and tests do: every test and file they cite exists, and
every link between them lands on a heading."""
import re

import pytest

from tests.helpers import PROJECT_DIR

DOCS = [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]
PROTOCOL = PROJECT_DIR / "docs" / "PROTOCOL.md"
USERS_OWN = {"instance/config.yaml"}  # what the documents tell a person to create


def anchors(path):
    """GitHub's anchors for a Markdown file's headings."""
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}


def test_the_readme_reads_in_five_minutes():
    assert len((PROJECT_DIR / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_test_a_document_cites_exists(doc):
    cited = set(re.findall(r"`(?:[\w/.]+::)?(test_\w+)`", doc.read_text()))
    defined = {name for path in (PROJECT_DIR / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert cited <= defined, f"cited but not defined: {sorted(cited - defined)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_file_a_document_cites_exists(doc):
    cited = set(re.findall(r"`((?:app|tests|scripts|docs|systemd|nginx|instance)/[\w/.-]+\.(?:py|md|log|sh|conf|"
                           r"service|yaml|json|js|html))", doc.read_text()))
    missing = [path for path in cited - USERS_OWN if not (PROJECT_DIR / path).is_file()]
    assert not missing, missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_link_between_the_documents_lands(doc):
    for target, anchor in re.findall(r"\]\(((?:\.\./|docs/)?[\w.]*\.md)?#?([\w-]*)\)", doc.read_text()):
        path = (doc.parent / target).resolve() if target else doc
        assert path.is_file(), f"{doc.name} links to {target}"
        if anchor:
            assert anchor in anchors(path), f"{doc.name} links to {target}#{anchor}, which is no heading"


def test_the_protocol_is_cited_where_it_lives():
    assert re.findall(r"`(?:[\w/.]+::)?(test_\w+)`", PROTOCOL.read_text()), "docs/PROTOCOL.md cites tests"
    for path in [*(PROJECT_DIR / "app").rglob("*.py"), *(PROJECT_DIR / "tests").glob("*.py")]:
        for line in path.read_text().splitlines():
            if "PROTOCOL.md" in line and path.name != "test_docs.py":
                assert "docs/PROTOCOL.md" in line, f"{path}: {line.strip()}"
