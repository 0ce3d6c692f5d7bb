"""Calibration and held-out text, split by document the same way for every issue that measures.

The six calibration texts of exllamav2 (catalog datasets ``wiki``, ``c4``, ``tiny``, ``code``,
``multilingual``, ``technical``) are cut into documents by their own structure:

- ``wiki``: ``<doc ...>`` ... ``</doc>`` blocks (the tags are removed);
- ``c4``: one document per line;
- ``tiny``: stories separated by ``<|endoftext|>``;
- ``code``, ``multilingual``, ``technical``: no document markers, so paragraphs separated by a
  blank line are the documents.

Empty documents are dropped. The **last 20% of documents** (rounded up, at least one) are the
held-out split used for perplexity; the rest is the calibration split. The split is a pure
function of the file, whose sha256 the catalog pins.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from edgerun import catalog
from edgerun.errors import UsageError

HELDOUT_FRACTION = 0.2
SPLITS = ("calibration", "heldout", "all")
_DOC_RE = re.compile(r"<doc[^>]*>\n?(.*?)</doc>", re.S)


def documents(name: str, split: str = "all", progress: bool = False) -> list[str]:
    """Documents of catalog dataset ``name`` in the requested split (``calibration``, ``heldout``, ``all``).

    Raises:
        UsageError: an unknown split.
        UnknownModelError: ``name`` is not a catalog dataset.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    docs = _all_documents(name, progress)
    n_held = max(1, math.ceil(len(docs) * HELDOUT_FRACTION))
    if split == "calibration":
        return docs[:-n_held]
    if split == "heldout":
        return docs[-n_held:]
    return list(docs)


@lru_cache(maxsize=None)
def _all_documents(name: str, progress: bool) -> tuple[str, ...]:
    text = catalog.dataset_path(name, progress=progress).read_text(encoding="utf-8")
    if name == "wiki":
        docs = _DOC_RE.findall(text)
    elif name == "c4":
        docs = text.split("\n")
    elif name == "tiny":
        docs = text.split("<|endoftext|>")
    else:
        docs = re.split(r"\n\s*\n", text)
    return tuple(d.strip() for d in docs if d.strip())


def text(name: str, split: str = "heldout", progress: bool = False) -> str:
    """The documents of a split joined by blank lines: the running text perplexity is measured on."""
    return "\n\n".join(documents(name, split, progress))
