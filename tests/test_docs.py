"""The README and the documentation site stay true to the code: the CSV contract lists the columns the
writer writes, links point at pages that exist, and the texts speak of the project, not its tracker."""

import re
from pathlib import Path

from cxr_deploy.batch.results_file import COLUMNS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _column_table(text: str) -> list[str]:
    """The first cell of each row of the first table whose header starts with ``| column |``."""
    rows = text[text.index("| column |"):].split("\n\n", 1)[0].splitlines()[2:]
    names = []
    for row in rows:
        names += re.findall(r"`([a-z_]+)`", row.split("|")[1])
    return names


def test_readme_and_docs_list_exactly_the_columns_the_writer_writes():
    assert _column_table(README.read_text()) == list(COLUMNS)
    assert _column_table((DOCS / "csv-schema.md").read_text()) == list(COLUMNS)


def test_readme_stays_short_and_links_to_pages_that_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith("http")]
    assert "docs/index.md" in local
    assert [link for link in local if not (ROOT / link).exists()] == []


def test_every_docs_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert pages and [p for p in pages if f" {p}" not in nav] == []


def test_readme_and_docs_speak_of_the_project_not_its_issue_tracker():
    pattern = re.compile(r"\b(issue|issues)\b|#\d{1,4}\b", re.IGNORECASE)
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in [README, *sorted(DOCS.rglob("*.md"))]
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
