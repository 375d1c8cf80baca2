"""The model families people quantize, each from a tiny random config with the built-in
tokenizer: LR-QAT layers, an exact merge, compressed-tensors loaded by transformers, and
GGUF written by llama.cpp's own converter and run by llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from lrqat.errors import LrqatError
from lrqat.export.formats import export
from lrqat.export.native import save_quantized
from lrqat.methods import apply_method
from lrqat.spec import LRQATSpec, QuantSpec
from lrqat.surgery import init_ranges, merge_model

W4 = QuantSpec(bits=4, symmetric=True, group_size=None)
TARGETS = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv_proj|gate_up_proj)$"
IDS = [1, 504, 3458, 28, 253, 1345, 314, 2030, 30, 1839, 281, 2135, 42, 17, 650, 314]


def family_config(name: str, tokenizer):
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id or 0, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return {"llama": lambda: LlamaConfig(**common, tie_word_embeddings=True),
            "mistral": lambda: MistralConfig(**common),
            "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=False),  # q/k/v biases
            "qwen3": lambda: Qwen3Config(**common, head_dim=16),  # q/k norms
            "gemma2": lambda: Gemma2Config(**common, head_dim=16),  # scaled embeddings, soft-capping, post-norms
            "gemma3": lambda: gemma3_config(common),
            "phi3": lambda: Phi3Config(**common)}[name]()  # fused qkv and gate_up


def gemma3_config(common: dict, **overrides) -> Gemma3TextConfig:
    """Gemma 3 as published: q/k norms, post-norms, scaled embeddings, and attention scaled
    by query_pre_attn_scalar = head_dim; one sliding layer (a window of 8, shorter than the
    test text, with its own rotary base) and one global layer, so the window, both bases and
    the layer pattern all reach the logits."""
    return Gemma3TextConfig(**{**common, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "full_attention"], **overrides})


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A SentencePiece tokenizer (800 BPE pieces trained on a slice of Brown), as Gemma,
    Phi-3 and Llama 2 ship theirs: a `tokenizer.model` that llama.cpp's converter reads."""
    import sentencepiece as spm

    from lrqat.data import brown_documents

    folder = tmp_path_factory.mktemp("sp")
    (folder / "text.txt").write_text("\n".join(d.text for d in brown_documents()[:60]))
    spm.SentencePieceTrainer.train(input=str(folder / "text.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=800, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}')
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer():
    from lrqat.models import convert_builtin

    return AutoTokenizer.from_pretrained(convert_builtin("smollm2-135m"))


def trained(name: str, tokenizer):
    """A tiny model of `name` with LR-QAT layers whose integers moved away from RTN."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(name, tokenizer)).eval()
    apply_method("lrqat", model, W4, LRQATSpec(rank=4), init_ranges(model, W4, TARGETS, "minmax"), targets=TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".A"):
                p.normal_(0, 0.5)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_merge_is_exact_and_transformers_loads_the_compressed_tensors_export(tmp_path, tokenizer, name):
    model = trained(name, tokenizer)
    training_time = logits(model)
    merge_model(model)
    assert torch.equal(logits(model), training_time)
    save_quantized(model, tokenizer, tmp_path / "model", W4)
    export(tmp_path, "compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "compressed-tensors", dtype=torch.float32)
    ours = logits(model)
    assert ((logits(theirs) - ours).abs().max() / ours.abs().max()).item() < 1e-5


def llama_cpp_logits(path, ids):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return llm, torch.tensor(np.array(llm.scores[: len(ids)]))


TEXT = "The jury said it did find that many of Georgia's 1,200 registration laws are outmoded."


# (Llama with the built-in BPE tokenizer is tested in test_export; Mistral is a Llama in llama.cpp)
@pytest.mark.parametrize(("name", "vocab"), [("qwen2", "bpe"), ("qwen3", "bpe"), ("gemma2", "sentencepiece"),
                                             ("gemma3", "sentencepiece"), ("phi3", "sentencepiece"),
                                             ("llama", "sentencepiece")])
def test_llama_cpp_runs_the_gguf_its_converter_wrote_from_our_integers(tmp_path, request, name, vocab):
    tokenizer = request.getfixturevalue("tokenizer" if vocab == "bpe" else "sp_tokenizer")
    model = trained(name, tokenizer)
    merge_model(model)
    save_quantized(model, tokenizer, tmp_path / "model", W4)
    report = export(tmp_path, "gguf")
    assert report["block_type"] == "Q4_0" and report["max_abs_weight_change"] < 1e-3  # fp16 scales only
    ids = tokenizer(TEXT).input_ids[:16]
    llm, theirs = llama_cpp_logits(report["path"], ids)
    ours = logits(model, ids)
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() < 0.05
    # random tiny models have near-ties: most, not all, top tokens agree
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.75
    # the same tokens, where the tokenizer is the family's own kind (Qwen's converter names its own
    # BPE pre-tokenizer; Gemma's SentencePiece adds no dummy prefix, the test tokenizer does)
    if (name, vocab) in (("phi3", "sentencepiece"), ("llama", "sentencepiece")):
        theirs_ids = llm.tokenize(TEXT.encode(), add_bos=False)
        assert theirs_ids == tokenizer(TEXT, add_special_tokens=False).input_ids


def test_an_architecture_llama_cpp_lacks_is_refused_in_one_line_naming_what_exports(tmp_path, tokenizer):
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, word_embed_proj_dim=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    apply_method("rtn", model, W4, None, init_ranges(model, W4, r"\.(q_proj|k_proj|v_proj)$"),
                 targets=r"\.(q_proj|k_proj|v_proj)$")
    save_quantized(model, tokenizer, tmp_path / "model", W4)
    with pytest.raises(LrqatError, match=r"llama.cpp has no OPTForCausalLM .* export compressed-tensors"):
        export(tmp_path, "gguf")


def test_a_gemma3_llama_cpp_would_scale_differently_is_refused_in_one_line(tmp_path, tokenizer):
    # transformers scales attention by query_pre_attn_scalar**-0.5 (its default, 256, is the
    # published head_dim); llama.cpp by 1/sqrt(head_dim), here 16: the GGUF would run wrong
    config = gemma3_config({"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                           query_pre_attn_scalar=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    apply_method("rtn", model, W4, None, init_ranges(model, W4, TARGETS), targets=TARGETS)
    save_quantized(model, tokenizer, tmp_path / "model", W4)
    with pytest.raises(LrqatError, match=r"1/sqrt\(16\) and ignores query_pre_attn_scalar \(256 here\)"):
        export(tmp_path, "gguf")
