"""Streaming data: lazy, deterministic by step, resumable, disjoint from evaluation."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lrqat.data as data_module
from lrqat.blocks import TokenStream, stream_eval_blocks
from lrqat.data import is_eval_document
from lrqat.methods import apply_lrqat
from lrqat.spec import LRQATSpec, QuantSpec, TrainSpec
from lrqat.trainer import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Twelve .jsonl files of twenty documents each."""
    folder = tmp_path_factory.mktemp("corpus")
    words = ["the", "river", "runs", "to", "the", "sea", "under", "a", "pale", "morning", "sky", "while", "seven", "wizards", "judge", "boxing", "matches"]
    for f in range(12):
        with (folder / f"part{f:02d}.jsonl").open("w") as handle:
            for d in range(20):
                text = " ".join(words[(f * 20 + d + k) % len(words)] for k in range(40 + d))
                handle.write(json.dumps({"text": f"Document {f}-{d}. {text}."}) + "\n")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_stream_reads_files_only_as_far_as_it_needs(corpus, tokenizer, monkeypatch):
    opened = []
    original = data_module.iter_file_documents

    def spy(path):
        opened.append(path.name)
        yield from original(path)

    monkeypatch.setattr(data_module, "iter_file_documents", spy)
    TokenStream(tokenizer, str(corpus), 16, 0.1, shuffle_buffer=4).batch(0, 2)
    assert len(opened) <= 2


def test_step_batches_do_not_depend_on_history(corpus, tokenizer):
    """Step k's blocks are the same whether the stream got there step by step or fresh
    (what a resumed run relies on), and they run on past the end of the corpus."""
    walked = TokenStream(tokenizer, str(corpus), 32, 0.1, seed=3, shuffle_buffer=8)
    batches = [walked.batch(k, 4) for k in range(60)]  # more than one epoch
    fresh = TokenStream(tokenizer, str(corpus), 32, 0.1, seed=3, shuffle_buffer=8)
    assert torch.equal(fresh.batch(41, 4), batches[41])
    assert torch.equal(walked.batch(7, 4), batches[7])  # going back replays
    assert not torch.equal(batches[0], TokenStream(tokenizer, str(corpus), 32, 0.1, seed=4, shuffle_buffer=8).batch(0, 4))


def test_eval_documents_never_reach_training(corpus, tokenizer):
    eval_ids = {f"{p.name}:{i}" for p in corpus.glob("*.jsonl") for i in range(1, 21) if is_eval_document(f"{p.name}:{i}", 0.3)}
    assert eval_ids
    eval_markers = {f"Document {int(i.split(':')[0][4:6])}-{int(i.split(':')[1]) - 1}." for i in eval_ids}
    stream = TokenStream(tokenizer, str(corpus), 2000, 0.3, shuffle_buffer=1)
    text = tokenizer.decode(torch.cat([stream.batch(k, 1)[0] for k in range(3)]))
    assert not any(m in text for m in eval_markers)
    evals = tokenizer.decode(stream_eval_blocks(tokenizer, str(corpus), 64, 512, 0.3).flatten())
    assert any(m in evals for m in eval_markers)


def test_streamed_training_resumes_on_the_same_trajectory(tmp_path, corpus, tokenizer, tiny_model_dir):
    def run(out, steps, resume):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        apply_lrqat(model, QuantSpec(bits=4, group_size=32), LRQATSpec(rank=4), init="minmax")
        # constant schedule: a 2-step run is then the first half of the 4-step run
        spec = TrainSpec(steps=steps, batch_size=2, seq_len=32, lr=1e-2, lr_scales=1e-4, warmup=0.0, schedule="constant", save_every=2)
        stream = TokenStream(tokenizer, str(corpus), 32, 0.1, shuffle_buffer=8)
        return train(model, stream, stream_eval_blocks(tokenizer, str(corpus), 64, 256, 0.1), spec, out,
                     resume=resume).losses

    straight = run(tmp_path / "a", 4, False)
    run(tmp_path / "b", 2, False)
    resumed = run(tmp_path / "b", 4, True)
    assert resumed == straight


def test_hugging_face_dataset_source_streams_its_text_column(tmp_path, corpus, tokenizer):
    """`hf:PATH` goes through the datasets library (a local dataset folder here; a hub
    name where a network exists)."""
    from lrqat.data import load_documents
    from lrqat.errors import LrqatError

    folder = tmp_path / "ds"
    folder.mkdir()
    for part in sorted(corpus.glob("*.jsonl"))[:3]:
        (folder / part.name).write_text(part.read_text())
    docs = load_documents(f"hf:{folder}")
    assert len(docs) == 60 and docs[0].text.startswith("Document 0-0.")
    stream = TokenStream(tokenizer, f"hf:{folder}", 32, 0.1, shuffle_buffer=4)
    assert stream.batch(2, 3).shape == (3, 32)
    with pytest.raises(LrqatError, match="cannot read dataset"):
        load_documents(f"hf:{tmp_path / 'missing'}")
