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
    common = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return {"llama": lambda: LlamaConfig(**common, tie_word_embeddings=True),
            "mistral": lambda: MistralConfig(**common),
            "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=False),  # q/k/v biases
            "qwen3": lambda: Qwen3Config(**common, head_dim=16),  # q/k norms
            "gemma2": lambda: Gemma2Config(**common, head_dim=16),  # scaled embeddings, soft-capping, post-norms
            "phi3": lambda: Phi3Config(**common, pad_token_id=0)}[name]()  # fused qkv and gate_up


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


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"])
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


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_llama_cpp_runs_the_gguf_its_converter_wrote_from_our_integers(tmp_path, tokenizer, name):
    from llama_cpp import Llama

    model = trained(name, tokenizer)
    merge_model(model)
    save_quantized(model, tokenizer, tmp_path / "model", W4)
    report = export(tmp_path, "gguf")
    assert report["block_type"] == "Q4_0" and report["max_abs_weight_change"] < 1e-3  # fp16 scales only
    llm = Llama(model_path=report["path"], n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(IDS)
    theirs = torch.tensor(np.array(llm.scores[: len(IDS)]))
    ours = logits(model)
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() < 0.05
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.9
    if name in ("llama", "mistral"):  # the built-in tokenizer is a Llama-family one; Qwen's converter names its own
        text = "The jury said it did find that many of Georgia's 1,200 registration laws are outmoded."
        assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text).input_ids


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
