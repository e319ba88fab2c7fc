"""The larger training corpus of `train_demo.py --corpus pydoc`: Python's own documentation topics
(`pydoc_data.topics`, shipped with Python), a seeded split of whole topics into training and held-out
text, and calibration text drawn from the training split; and the still larger one of `--corpus pysource`:
those topics plus the .py files of the standard library and of named installed packages, a file a document."""

from __future__ import annotations

import random
from pathlib import Path

PYDOC_CORPUS = "pydoc"  # --corpus value: Python's own documentation topics


def load_topics(corpus: str) -> list[str]:
    """Top-level documents of a corpus: pydoc topics, or the whole file as one."""
    if corpus == PYDOC_CORPUS:
        from pydoc_data.topics import topics

        return [topics[k].strip("\n") for k in sorted(topics)]
    return [Path(corpus).read_text(encoding="utf-8")]


def split_heldout(topics: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of whole topics into (train, held-out); fraction 0 keeps all."""
    if fraction <= 0:
        return topics, []
    order = list(range(len(topics)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(topics) * fraction))
    held = set(order[:n_held])
    train = [t for i, t in enumerate(topics) if i not in held]
    return train, [topics[i] for i in sorted(held)]


def pick_documents(docs: list[str], chars: int, seed: int) -> list[str]:
    """Seeded sample of whole documents, about ``chars`` long in all (at least one)."""
    order = list(range(len(docs)))
    random.Random(seed + 1).shuffle(order)
    picked: list[str] = []
    total = 0
    for i in order:
        if total >= chars:
            break
        picked.append(docs[i])
        total += len(docs[i]) + 2
    return picked


def calibration_text(docs: list[str], chars: int, seed: int) -> str:
    """Seeded sample of training documents, joined by blank lines, about ``chars`` long."""
    return "\n\n".join(pick_documents(docs, chars, seed)) + "\n"


# ---- --corpus pysource: Python sources shipped with this interpreter -------------------------------

SOURCE_CORPUS = "pysource"  # --corpus value: pydoc topics + the standard library's .py files (+ packages)
SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test"})
MAX_SOURCE_CHARS = 300_000  # larger files are generated tables, not prose or code people wrote


def _python_files(root: Path) -> list[Path]:
    """Every .py file under root, sorted, outside test and package folders."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if not SKIPPED_DIRS & set(path.relative_to(root).parts[:-1]):
            found.append(path)
    return found


def _package_root(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--corpus-packages: {name!r} is not an installed package (a folder of modules)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_sources(packages: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """Documents of --corpus pysource: the pydoc topics, then each readable .py file of the standard
    library and of the named installed packages (one file a document), in a fixed order; also how
    many documents each part gave."""
    import sysconfig

    try:
        docs = load_topics(PYDOC_CORPUS)
    except ImportError:  # a Python packaged without pydoc_data
        docs = []
    counts = {"pydoc_topics": len(docs)}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [("stdlib", stdlib)] + [(name, _package_root(name)) for name in packages]
    for label, root in roots:
        before = len(docs)
        for path in _python_files(root):
            if label == "stdlib" and path.parts[-2:] == ("pydoc_data", "topics.py"):
                continue  # the topics again, as one Python literal
            try:
                text = path.read_text(encoding="utf-8").strip("\n")
            except (UnicodeDecodeError, OSError):
                continue
            if text and len(text) <= MAX_SOURCE_CHARS:
                docs.append(text)
        counts[label] = len(docs) - before
    return docs, counts
