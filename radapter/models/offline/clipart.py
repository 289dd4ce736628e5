"""Image-text pairs from Debian's ``openclipart-png``: the registry data the LiT alignment uses.

The package ships ~8,300 PNGs in ~150 topic folders (``animals/birds``, ``food/fruit``,
``signs_and_symbols/flags/europe``...). A file name is a shortened title plus the author
(``emperor_penguin_ralf_ste_01.png``), often Italian. A caption keeps the title's English
words (those WordNet knows, from Debian ``wordnet-base``) and adds the folder words::

    animals/birds/emperor_penguin_ralf_ste_01.png -> "emperor penguin, birds, animals"

Folders without meaning for the alignment (gradients, patterns, jigsaw pieces, flowchart
boxes) are skipped and the ~1,400 near-identical stars are capped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

CLIPART_ROOT = Path("/usr/share/openclipart/png")
WORDNET_ROOT = Path("/usr/share/wordnet")
SKIP_FOLDERS = ("special", "shapes/jigsaw", "shapes/flowchart", "shapes/callouts")
CAPPED_FOLDERS = {"shapes/stars": 40, "computer/icons": 600}
MAX_FILE_BYTES = 8 << 20  # a few files are huge (one is 231 Mpx): guard the loader
MAX_PIXELS = 16_000_000
# Folder names that are words of no use in a caption.
_FOLDER_STOP = {"png", "icons", "theme", "misc", "unsorted", "bw", "etiquette", "lemon", "flat", "actions", "action"}
_TITLE_STOP = {"architetto", "clip", "art", "clipart", "openclipart", "icon", "gnome", "mime", "image", "png", "svg",
               "the", "and", "with", "for", "from", "simple", "one", "two", "three", "des", "del", "con", "per"}


@cache
def wordnet_lemmas(root: Path = WORDNET_ROOT) -> frozenset[str]:
    """Single-word lemmas of WordNet's nouns, adjectives and verbs (``wordnet-base``)."""
    words: set[str] = set()
    for part in ("noun", "adj", "verb"):
        path = root / f"index.{part}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: apt-get install wordnet-base")
        with open(path, encoding="latin-1") as f:
            for line in f:
                if not line.startswith(" "):
                    lemma = line.split(" ", 1)[0]
                    if "_" not in lemma and lemma.isalpha():
                        words.add(lemma)
    return frozenset(words)


def title_words(stem: str, lemmas: frozenset[str]) -> list[str]:
    """English words of a file-name title, in order, without repeats."""
    stem = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)  # camelCase titles
    out: list[str] = []
    for token in re.split(r"[^A-Za-z]+", stem.lower()):
        if len(token) >= 3 and token in lemmas and token not in _TITLE_STOP and token not in out:
            out.append(token)
    return out


def folder_words(parts: tuple[str, ...]) -> list[str]:
    words: list[str] = []
    for part in reversed(parts):  # the most specific folder first
        phrase = " ".join(w for w in re.split(r"[_\-\s]+", part.lower()) if w and w not in _FOLDER_STOP)
        if phrase and phrase not in words:
            words.append(phrase)
    return words


def caption(path: Path, root: Path, lemmas: frozenset[str]) -> str:
    parts = path.relative_to(root).parent.parts
    title = title_words(path.stem, lemmas)
    folders = folder_words(parts)
    if title and folders and title[-1] == folders[0].split()[-1]:
        folders = folders[1:]
    return ", ".join([" ".join(title)] * bool(title) + folders)


def clipart_pairs(root: Path = CLIPART_ROOT) -> list[tuple[Path, str]]:
    """``(png, caption)`` pairs, sorted by path (deterministic)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: apt-get install openclipart-png")
    lemmas = wordnet_lemmas()
    counts: dict[str, int] = {}
    pairs: list[tuple[Path, str]] = []
    for path in _pngs(root):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(SKIP_FOLDERS) or path.stat().st_size > MAX_FILE_BYTES or not _reasonable_size(path):
            continue
        capped = next((f for f in CAPPED_FOLDERS if rel.startswith(f)), None)
        if capped:
            counts[capped] = counts.get(capped, 0) + 1
            if counts[capped] > CAPPED_FOLDERS[capped]:
                continue
        text = caption(path, root, lemmas)
        if text:
            pairs.append((path, text))
    return pairs


def _reasonable_size(path: Path) -> bool:
    """Whether the PNG header promises at most :data:`MAX_PIXELS` (reads the header only)."""
    with open(path, "rb") as f:
        header = f.read(24)
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    return 0 < width * height <= MAX_PIXELS


def _pngs(root: Path) -> Iterator[Path]:
    yield from sorted(root.rglob("*.png"))
