"""Real English sentences for calibrating and evaluating text models, from the standard library's docstrings.

`sentences()` walks a fixed, sorted list of stdlib modules: each module's docstring, then the
docstrings of its public classes and functions (and the methods of those classes) in name
order, keeping only objects defined in that module. Doctest and indented code lines are
dropped, each paragraph's whitespace is collapsed, it is split after . ! ? before a capital letter,
and a sentence is kept when it starts with a capital, ends with . ! or ?, has 6..40 words
and is mostly letters. Duplicates are dropped, first occurrence kept.

`calibration_sentences` and `evaluation_sentences` come from one shuffle of that list with
`random.Random(0)`: calibration takes the even positions, evaluation the odd ones, so they
never share a sentence. The text depends on the Python version's docstrings; within one
Python it is the same in every run.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import warnings

MODULES = sorted([
    "argparse", "ast", "asyncio.events", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "ftplib", "functools", "gettext", "gzip", "heapq", "http.client", "http.cookiejar", "imaplib",
    "inspect", "ipaddress", "json", "logging", "mailbox", "pathlib", "pdb", "pickle", "pprint", "random", "shutil",
    "smtplib", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "zipfile",
])
SEED = 0
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\s{4}|\$ )")


def _docstrings(module) -> list[str]:
    docs = [module.__doc__]
    for name, obj in sorted(inspect.getmembers(module)):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            docs += [m.__doc__ for n, m in sorted(vars(obj).items())
                     if (not n.startswith("_") or n == "__init__") and inspect.isfunction(m)]
    return [d for d in docs if isinstance(d, str)]


def _sentences_of(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [ln for ln in para.splitlines() if not _CODE_LINE.match(ln)]
        out += [s for s in _SPLIT.split(" ".join(" ".join(lines).split())) if _keep(s)]
    return out


def _keep(s: str) -> bool:
    return (6 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?"
            and sum(c.isalpha() for c in s) >= 0.7 * len(s.replace(" ", "")))


@functools.cache
def _all() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            for doc in _docstrings(importlib.import_module(name)):
                for s in _sentences_of(doc):
                    seen.setdefault(s, None)
    return tuple(seen)


@functools.cache
def _shuffled() -> tuple[str, ...]:
    order = list(_all())
    random.Random(SEED).shuffle(order)
    return tuple(order)


def sentences(n: int | None = None) -> list[str]:
    """The first `n` corpus sentences in walk order (all of them when n is None)."""
    return list(_all()[:n])


def calibration_sentences(n: int = 64) -> list[str]:
    """`n` sentences from the even positions of the seeded shuffle; disjoint from `evaluation_sentences`."""
    return list(_shuffled()[0::2][:n])


def evaluation_sentences(n: int = 256) -> list[str]:
    """`n` sentences from the odd positions of the seeded shuffle; disjoint from `calibration_sentences`."""
    return list(_shuffled()[1::2][:n])
