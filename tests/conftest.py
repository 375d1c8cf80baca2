"""Shared fixtures: tiny random Llama models built from a config (no download)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n auto`), split the cores between the
    workers: each worker's torch, and the CLI processes it starts, get their share of
    threads, since two workers at full thread count each run slower than one alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch):
    """Tests see bf16 as native whatever CPU runs them (AMX, or emulated on AVX2), so what
    depends on its speed (teacher dtype, memory advice, warnings) is the same everywhere;
    tests of the emulated case set the slowdown themselves."""
    monkeypatch.setattr("lrqat.runtime.bf16_slowdown", lambda: 1.0)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests out of the user's cache unless they use the real built-in assets."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF folder with the built-in model's real tokenizer,
    so CLI and pipeline tests run in seconds."""
    from transformers import AutoTokenizer

    from lrqat.models import convert_builtin

    tokenizer = AutoTokenizer.from_pretrained(convert_builtin("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small local corpus: 40 paragraphs of varied sentences."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards",
             "quietly", "judge", "boxing", "matches", "and", "every", "river", "runs", "to", "the", "sea", "under",
             "a", "pale", "morning", "sky"]
    paragraphs = []
    for i in range(40):
        sentence = " ".join(words[(i * 7 + k) % len(words)] for k in range(60))
        paragraphs.append(sentence.capitalize() + ".")
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def metrics_reached(out, step):
    """True once a run in `out` has logged `step` training steps."""
    metrics = out / "metrics.jsonl"
    return metrics.exists() and len(metrics.read_text().splitlines()) >= step
