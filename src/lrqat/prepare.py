"""`lrqat setup`: put the built-in corpus and model into the cache ahead of the first run."""

from __future__ import annotations

from lrqat.data import fetch_brown
from lrqat.models import BUILTIN_MODELS, convert_builtin


def prepare() -> None:
    """Fetch the Brown corpus and convert every built-in model once (idempotent)."""
    print(f"corpus: {fetch_brown()}")
    for name in BUILTIN_MODELS:
        print(f"model {name}: {convert_builtin(name)}")
