"""The documentation's pointers lead somewhere: every relative link in README.md and docs/ names a file that
exists, the README links the design notes, and nothing cites a design file the project does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_relative_link_names_an_existing_file() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_links_the_design_notes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/design.md)" in readme
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    for topic in ("norm-shift", "RMSNorm", "one extra", "tolerance"):
        assert topic.lower() in design.lower(), topic


def test_no_file_cites_a_design_file_the_project_lacks() -> None:
    """Code and docs once cited DESIGN.md, which lived outside the repository."""
    files = [*PAGES, *ROOT.glob("normswap/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*")]
    citing = [str(path.relative_to(ROOT)) for path in files
              if path.is_file() and path.name != Path(__file__).name
              and "DESIGN.md" in path.read_text(encoding="utf-8", errors="replace")]
    assert not citing, citing
