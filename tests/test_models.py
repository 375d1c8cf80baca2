"""Built-in models from package registries: a GGUF in one package or split across several."""

from __future__ import annotations

import hashlib
import importlib

import pytest

from lrqat import models
from lrqat.errors import LrqatError
from lrqat.models import BuiltinModel, GGUFPart


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    """A fake built-in model whose 'GGUF' is split across three importable packages."""
    site = tmp_path / "site"
    pieces = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)) * 3, b"tail"]
    parts = []
    for i, piece in enumerate(pieces, 1):
        package = site / f"fake_split_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(piece)
        parts.append(GGUFPart(f"fake_split_part{i}", f"data/part{i:02d}.bin", f"fake-split-part{i}==1.0"))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("LRQAT_CACHE", str(tmp_path / "cache"))
    whole = b"".join(pieces)
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake-split",
                        BuiltinModel(tuple(parts), sha256=hashlib.sha256(whole).hexdigest()))
    return whole


def test_split_parts_are_joined_in_order_once_and_checked(split_model, tmp_path):
    path = models.builtin_gguf_path("fake-split")
    assert path == tmp_path / "cache" / "gguf" / "fake-split.gguf"
    assert path.read_bytes() == split_model
    assert models.builtin_gguf_path("fake-split") == path  # joined once, then reused


def test_a_part_that_does_not_match_the_recorded_hash_is_refused(split_model, tmp_path, monkeypatch):
    builtin = models.BUILTIN_MODELS["fake-split"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake-split", BuiltinModel(builtin.parts, sha256="0" * 64))
    with pytest.raises(LrqatError, match="do not match the recorded sha256"):
        models.builtin_gguf_path("fake-split")
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-joined is left


def test_a_missing_part_names_the_setup_command(split_model, monkeypatch):
    builtin = models.BUILTIN_MODELS["fake-split"]
    gone = GGUFPart("fake_split_part_absent", "data/x.bin", "fake-split-absent==1.0")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake-split", BuiltinModel((*builtin.parts, gone)))
    with pytest.raises(LrqatError, match="lrqat setup --model fake-split"):
        models.builtin_gguf_path("fake-split")


def test_setup_refuses_an_unknown_built_in_model(capsys):
    from lrqat.cli import main

    assert main(["setup", "--model", "gpt-5"]) == 2
    assert "unknown built-in model gpt-5" in capsys.readouterr().err


@pytest.mark.slow
def test_the_second_real_model_loads_and_predicts_text():
    """Qwen2.5-Coder-0.5B (six PyPI packages, `lrqat setup --model qwen2.5-0.5b`): skipped
    where it is not set up (CI need not download 490 MB)."""
    import importlib.util

    if any(importlib.util.find_spec(p.package) is None for p in models.BUILTIN_MODELS["qwen2.5-0.5b"].parts):
        pytest.skip("qwen2.5-0.5b is not set up: lrqat setup --model qwen2.5-0.5b")
    import torch

    from lrqat.evaluate import perplexity

    model, tokenizer = models.load_model("qwen2.5-0.5b")
    assert model.config.model_type == "qwen2" and model.config.vocab_size > 150_000
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
                    return_tensors="pt").input_ids
    assert perplexity(model, ids).ppl < 20  # a code model predicts code
    assert torch.isfinite(model(ids).logits).all()
