"""Exports verified by their real consumers: transformers, the gguf reader, llama.cpp."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

from lrqat.errors import LrqatError
from lrqat.export.formats import export, merged_model_dir
from lrqat.export.gguf_read import FastGGUFReader
from lrqat.export.native import load_quantized, save_quantized
from lrqat.export.tensors import quant_layers
from lrqat.methods import DEFAULT_TARGETS, apply_method
from lrqat.spec import LRQATSpec, QuantSpec
from lrqat.surgery import init_ranges, merge_model

LR = LRQATSpec(rank=4)
W4_SYM = QuantSpec(bits=4, symmetric=True, group_size=None)
W4_G32_ASYM = QuantSpec(bits=4, symmetric=False, group_size=32)
W8_G64_SYM = QuantSpec(bits=8, symmetric=True, group_size=64)
W3_G32_ASYM = QuantSpec(bits=3, symmetric=False, group_size=32)


def merged_run(folder, tiny_model_dir, spec: QuantSpec):
    """A merged LR-QAT model whose integers moved away from RTN (random A), saved as a run."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    apply_method("lrqat", model, spec, LR, init_ranges(model, spec, DEFAULT_TARGETS, "minmax"), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".A"):  # A starts at zero (selected by name: a scale tensor can be (out, rank) too)
                p.normal_(0, 0.5)
    merge_model(model)
    save_quantized(model, AutoTokenizer.from_pretrained(tiny_model_dir), folder / "model", spec)
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 504, 3458, 28, 253, 1345, 314, 2030, 30, 1839, 281, 2135, 42, 17, 650, 314]])


@pytest.mark.parametrize("spec", [W4_SYM, W4_G32_ASYM, W8_G64_SYM, W3_G32_ASYM], ids=lambda s: s.describe())
def test_transformers_loads_compressed_tensors_and_computes_what_we_compute(tmp_path, tiny_model_dir, spec):
    run = merged_run(tmp_path, tiny_model_dir, spec)
    report = export(run, "compressed-tensors")
    folder = run / "export" / "compressed-tensors"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (spec.bits, spec.symmetric, spec.group_size)
    assert weights["strategy"] == ("channel" if spec.group_size is None else "group")
    assert config["ignore"] == ["lm_head"]

    ours = load_quantized(run / "model")
    # Asymmetric packed zero points load only through the dequantizing route in
    # transformers 5.23 / compressed-tensors 0.20 (llm-compressor issue 1618).
    extra = {} if spec.symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    assert torch.equal(logits(theirs, IDS), logits(ours, IDS))
    assert report["quantized_layer_bytes"] > 0 and report["bits_per_quantized_weight"] >= spec.bits


def test_compressed_tensors_holds_our_integers(tmp_path, tiny_model_dir):
    """Unpacked with the library's own reader, the checkpoint holds exactly the trained integers."""
    from safetensors.torch import load_file

    spec = W4_G32_ASYM
    run = merged_run(tmp_path, tiny_model_dir, spec)
    export(run, "compressed-tensors")
    state = load_file(str(run / "export" / "compressed-tensors" / "model.safetensors"))
    for name, layer in quant_layers(load_quantized(run / "model")):
        shape = (layer.out_features, layer.in_features)
        q = unpack_from_int32(state[f"{name}.weight_packed"], 4, shape).float() + 8
        z = unpack_from_int32(state[f"{name}.weight_zero_point"], 4, layer.zeros.shape, packed_dim=0).float() + 8
        assert torch.equal(q, layer.int_weight()) and torch.equal(z, layer.zeros)
        assert torch.equal(state[f"{name}.weight_scale"], layer.scales)


def rotary_permutation(rows, heads):
    """Row order llama.cpp expects for q/k projections: per head, the halves interleaved."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def expected_gguf_weight(layer):
    """What a GGUF block decodes to: our integers with scales (and Q4_1 offsets) in fp16."""
    q, s, z = layer.int_weight(), layer.scales.half().float(), layer.zeros
    g = q.shape[1] // s.shape[1]
    qg = q.reshape(q.shape[0], -1, g)
    if z is None:
        return (qg * s.unsqueeze(-1)).reshape(q.shape)
    m = (-s * z).half().float()
    return (qg * s.unsqueeze(-1) + m.unsqueeze(-1)).reshape(q.shape)


@pytest.mark.parametrize(("spec", "block"), [(W4_SYM, "Q4_0"), (W4_G32_ASYM, "Q4_1"), (W8_G64_SYM, "Q8_0")],
                         ids=["q4_0", "q4_1", "q8_0"])
def test_gguf_blocks_decode_to_our_integers(tmp_path, tiny_model_dir, spec, block):
    run = merged_run(tmp_path, tiny_model_dir, spec)
    report = export(run, "gguf")
    assert report["block_type"] == block
    path = run / "export" / "gguf" / "model.gguf"
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    ours = load_quantized(run / "model")
    heads = {"q_proj": ours.config.num_attention_heads, "k_proj": ours.config.num_key_value_heads}
    for name, layer in quant_layers(ours):
        layer_idx, role = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        gguf_role = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[role]
        t = tensors[f"blk.{layer_idx}.{gguf_role}.weight"]
        assert t.tensor_type.name == block
        decoded = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        expected = expected_gguf_weight(layer)
        if role in heads:
            expected = expected[rotary_permutation(layer.out_features, heads[role])]
        assert torch.equal(decoded, expected)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("llama.", "tokenizer.ggml.pre"))}
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.pre"] == "smollm"  # llama.cpp's converter recognises the tokenizer
    fast = FastGGUFReader(path)  # the reader lrqat checks its exports with: the same file, read the same
    assert {k: f.contents() for k, f in fast.fields.items()} == {k: f.contents() for k, f in reader.fields.items()}
    assert [(t.name, t.tensor_type, t.n_bytes, t.data.tobytes()) for t in fast.tensors] == [
        (t.name, t.tensor_type, t.n_bytes, t.data.tobytes()) for t in reader.tensors]


@pytest.mark.parametrize("spec", [W4_SYM, W4_G32_ASYM], ids=["q4_0", "q4_1"])
def test_transformers_reads_our_gguf_back_exactly(tmp_path, tiny_model_dir, spec):
    """transformers' own GGUF loader (which undoes llama.cpp's rotary row order) gives our
    weights with fp16 scales, and logits within the fp16 rounding of the scales."""
    run = merged_run(tmp_path, tiny_model_dir, spec)
    export(run, "gguf")
    theirs = AutoModelForCausalLM.from_pretrained(run / "export" / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    state = theirs.state_dict()
    ours = load_quantized(run / "model")
    for name, layer in quant_layers(ours):
        assert torch.equal(state[f"{name}.weight"], expected_gguf_weight(layer))
    assert torch.equal(state["model.embed_tokens.weight"], ours.model.embed_tokens.weight)
    a, b = logits(ours, IDS), logits(theirs, IDS)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-2


def test_llama_cpp_runs_our_gguf(tmp_path, tiny_model_dir):
    """llama.cpp itself loads the file and predicts what our model predicts."""
    from llama_cpp import Llama

    run = merged_run(tmp_path, tiny_model_dir, W4_SYM)
    export(run, "gguf")
    llm = Llama(model_path=str(run / "export" / "gguf" / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    ours = logits(load_quantized(run / "model"), IDS)[0]
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() < 0.05
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item() >= 0.9
    text = "The jury said it did find that many of Georgia's 1,200 registration laws are outmoded."
    assert llm.tokenize(text.encode(), add_bos=False) == AutoTokenizer.from_pretrained(tiny_model_dir)(text).input_ids


def test_hf_dequantized_is_a_plain_float_model_computing_the_same(tmp_path, tiny_model_dir):
    run = merged_run(tmp_path, tiny_model_dir, W4_G32_ASYM)
    export(run, "hf-dequantized")
    theirs = AutoModelForCausalLM.from_pretrained(run / "export" / "hf-dequantized", dtype=torch.float32)
    assert not quant_layers(theirs)
    assert torch.equal(logits(theirs, IDS), logits(load_quantized(run / "model"), IDS))


@pytest.mark.parametrize(("spec", "message"), [
    (W3_G32_ASYM, "no lossless GGUF block type"),
    (QuantSpec(bits=8, symmetric=False, group_size=32), "no lossless GGUF block type"),
    (QuantSpec(bits=4, symmetric=True, group_size=16), "not a multiple of 32"),
])
def test_gguf_refuses_settings_it_cannot_hold_exactly(tmp_path, tiny_model_dir, spec, message):
    run = merged_run(tmp_path, tiny_model_dir, spec)
    with pytest.raises(LrqatError, match=message):
        export(run, "gguf")
    assert not (run / "export" / "gguf" / "model.gguf").exists()


def test_export_names_bad_inputs(tmp_path, tiny_model_dir):
    with pytest.raises(LrqatError, match="no quantization.json"):
        merged_model_dir(tmp_path)
    run = merged_run(tmp_path, tiny_model_dir, W4_SYM)
    with pytest.raises(LrqatError, match="unknown export format"):
        export(run, "onnx")
