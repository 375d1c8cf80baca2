"""Activation and KV-cache quantization: the quantizer, where it sits, that training,
merging, saving and exporting all compute the same function with it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_llama
from lrqat.activations import ATTRIBUTE, ActSpec, fake_quantize_per_token, install, placements, remove
from lrqat.errors import LrqatError
from lrqat.export.formats import check_exportable, export
from lrqat.export.native import load_quantized, read_online, save_quantized
from lrqat.methods import DEFAULT_TARGETS, METHODS, apply_method
from lrqat.online import planned_rotation, prepare
from lrqat.pipeline import run_quantize
from lrqat.rotation import RotationRecord
from lrqat.spec import LRQATSpec, QuantSpec, RunSpec
from lrqat.surgery import find_targets, init_ranges, merge_model

IDS = torch.tensor([[1, 504, 3458, 28, 253, 1345, 314, 2030, 30, 1839, 281, 2135, 42, 17, 650, 314]])
W4 = QuantSpec(bits=4, symmetric=True, group_size=None)


def target_names(model):
    return [name for name, _ in find_targets(model, DEFAULT_TARGETS)]


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_quantizer_is_an_asymmetric_min_max_grid(bits):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 64) + 0.5
    y = fake_quantize_per_token(x, bits)
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    step = (hi - lo) / (2**bits - 1)
    # every value is an integer multiple of its token's step (zero is exact), the grid
    # spans 2^bits levels, and no value moves more than half a step
    codes = y / step[..., None]
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert ((codes.amax(-1) - codes.amin(-1)).round() <= 2**bits - 1).all()
    assert ((y - x).abs() <= step[..., None] / 2 + 1e-5).all()
    assert (y == 0).sum() >= (x == 0).sum()
    assert torch.equal(fake_quantize_per_token(x, 16), x)


def test_quantizer_gradient_is_straight_through():
    x = torch.randn(4, 32, requires_grad=True)
    weights = torch.randn(4, 32)
    (fake_quantize_per_token(x, 4) * weights).sum().backward()
    assert torch.allclose(x.grad, weights, rtol=1e-6, atol=0)  # (w / s) · s in floating point


def test_placement_names_every_quantized_tensor_of_a_block_for_4_8_4():
    model = tiny_llama()
    install(model, ActSpec(bits=8, kv_bits=4), target_names(model))
    names = placements(model)
    block = sorted(n.removeprefix("model.layers.0.") for n in names if n.startswith("model.layers.0."))
    assert block == sorted([
        "self_attn.q_proj:input@8", "self_attn.k_proj:input@8", "self_attn.v_proj:input@8",
        "self_attn.o_proj:input@8", "mlp.gate_proj:input@8", "mlp.up_proj:input@8", "mlp.down_proj:input@8",
        "self_attn:query@8", "self_attn:key@4", "self_attn:value@4",
    ])
    assert len(names) == 10 * model.config.num_hidden_layers  # embeddings, norms, head stay float
    remove(model)
    assert placements(model) == [] and model.config._attn_implementation == "sdpa"


def test_float_settings_change_nothing_and_kv_bits_change_attention_only():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        install(model, ActSpec(16, 16), target_names(model))
        assert torch.equal(model(ids).logits, reference)
        install(model, ActSpec(16, 4), target_names(model))
        assert model.config._attn_implementation == "lrqat_sdpa"
        kv4 = model(ids).logits
        assert not torch.allclose(kv4, reference, atol=1e-4)
        # the wrapped attention is the model's own: with its quantizer at 16 bits it is exact
        for module in model.modules():
            if hasattr(module, ATTRIBUTE):
                getattr(module, ATTRIBUTE).kv_bits = 16
        assert torch.equal(model(ids).logits, reference)


def test_generation_with_a_kv_cache_matches_the_full_forward():
    """K/V are quantized per token, so a cached decode scores as the full sequence does."""
    model = tiny_llama()
    install(model, ActSpec(8, 4), target_names(model))
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = model(out).logits[0, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(full, out[0, ids.shape[1]:])


def test_quantizers_survive_method_surgery_and_merging():
    model = tiny_llama()
    install(model, ActSpec(8, 8), target_names(model))
    before = placements(model)
    apply_method("lrqat", model, W4, LRQATSpec(rank=4), init_ranges(model, W4, DEFAULT_TARGETS, "minmax"))
    assert placements(model) == before
    merge_model(model)
    assert placements(model) == before


def settings(tiny_model_dir, text_file, out, act, kv, rotate, method="lrqat"):
    raw = {"model": str(tiny_model_dir), "output": str(out), "method": method, "rotate": rotate,
           "act": {"bits": act, "kv_bits": kv}, "quant": {"bits": 4, "group_size": None},
           "ptq": {"init": "minmax", "calib_tokens": 64}, "lrqat": {"rank": 4},
           "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "save_every": 0},
           "data": {"source": str(text_file), "eval_context": 64, "eval_tokens": 128}}
    return RunSpec.from_dict(raw)


@pytest.mark.parametrize(("act", "kv", "rotate"), [(8, 8, "none"), (8, 4, "hadamard"), (4, 4, "hadamard")],
                         ids=["4-8-8", "4-8-4-rot", "4-4-4-rot"])
def test_merged_model_computes_what_training_computed_and_reloads_the_same(tmp_path, tiny_model_dir, text_file,
                                                                          act, kv, rotate):
    out = tmp_path / "run"
    results = run_quantize(settings(tiny_model_dir, text_file, out, act, kv, rotate), log=lambda _: None)
    ppl = results.ppl
    assert abs(ppl["lrqat_merged"] - ppl["lrqat"]) / ppl["lrqat"] < 1e-4
    assert ppl["float_act"] != ppl["float"]
    saved_act, record = read_online(out / "model")
    assert saved_act == ActSpec(act, kv) and record == planned_rotation(rotate, ActSpec(act, kv))
    reloaded = load_quantized(out / "model")
    from lrqat.blocks import load_token_data
    from lrqat.evaluate import perplexity

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = load_token_data(tokenizer, str(text_file), 32, 64, 128, 0.1, max_train_tokens=128, seed=0, streaming=False)
    assert abs(perplexity(reloaded, data.eval).ppl - ppl["lrqat_merged"]) / ppl["lrqat_merged"] < 1e-4


@pytest.mark.parametrize("method", [m for m, meta in METHODS.items() if m != "lrqat" and meta.quantized])
def test_every_method_runs_with_rotation_and_4_bit_activations(tmp_path, tiny_model_dir, text_file, method):
    results = run_quantize(settings(tiny_model_dir, text_file, tmp_path / "run", 4, 4, "hadamard", method),
                           log=lambda _: None)
    merged = results.ppl[f"{method}_merged"]
    if method != "naive-lora":  # its merge re-quantizes base + A·B: lossy by design
        assert abs(merged - results.ppl[method]) / merged < 1e-4
    assert len(placements(load_quantized(tmp_path / "run" / "model"))) == 10 * 2


def merged_with(tiny_model_dir, folder, act, rotate):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    record = prepare(model, act, rotate, 0, target_names(model))
    apply_method("lrqat", model, W4, LRQATSpec(rank=4), init_ranges(model, W4, DEFAULT_TARGETS, "minmax"))
    merge_model(model)
    save_quantized(model, AutoTokenizer.from_pretrained(tiny_model_dir), folder / "model", W4, act=act, rotation=record)
    return model


def test_compressed_tensors_w4a8_is_loaded_by_transformers_with_its_activation_scheme(tmp_path, tiny_model_dir):
    ours = merged_with(tiny_model_dir, tmp_path, ActSpec(8, 16), "none")
    report = export(tmp_path, "compressed-tensors")
    folder = tmp_path / "export" / "compressed-tensors"
    group = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    inputs = group["input_activations"]
    assert (inputs["num_bits"], inputs["type"], inputs["strategy"], inputs["dynamic"], inputs["symmetric"]) == \
        (8, "int", "token", True, False)
    assert report["act"] == "A8 KV16"
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        a, b = theirs(IDS).logits, ours(IDS).logits
        # runtimes quantize the linears' inputs exactly as lrqat does; Q stays float there
        for module in ours.modules():
            if hasattr(module, ATTRIBUTE):
                getattr(module, ATTRIBUTE).query_bits = 16
        assert torch.equal(a, ours(IDS).logits)
    assert not torch.equal(a, b) and ((a - b).abs().max() / b.abs().max()).item() < 0.05


@pytest.mark.parametrize(("formats", "act", "rotation", "message"), [
    (["gguf"], ActSpec(8, 16), RotationRecord(), "--act-bits 16"),
    (["compressed-tensors"], ActSpec(4, 16), RotationRecord(), "--act-bits 8"),
    (["compressed-tensors"], ActSpec(8, 4), RotationRecord(), "--kv-bits 16"),
    (["hf-dequantized"], ActSpec(16, 8), RotationRecord(), "plain float"),
    (["gguf"], ActSpec(16, 4), RotationRecord("hadamard", False, True), "R3"),
    (["compressed-tensors"], ActSpec(8, 16), RotationRecord("hadamard", True, True), "R4"),
])
def test_formats_refuse_what_they_cannot_hold(formats, act, rotation, message):
    with pytest.raises(LrqatError, match=message.replace("-", r"\-")):
        check_exportable(formats, W4, act, rotation)


def test_gguf_of_a_kv_quantized_model_names_llama_cpp_cache_types(tmp_path, tiny_model_dir):
    merged_with(tiny_model_dir, tmp_path, ActSpec(16, 4), "none")
    report = export(tmp_path, "gguf")
    assert report["llama_cpp_cache"]["type_k"] == "q4_0" and "--cache-type-v q4_0" in report["llama_cpp_cache"]["flags"]


@pytest.mark.parametrize(("raw", "message"), [
    ({"act": {"bits": 6}}, "--act-bits 6"),
    ({"act": {"kv_bits": 2}}, "--kv-bits 2"),
    ({"rotate": "givens"}, "unknown rotation"),
    ({"act": {"bits": "8"}}, "wrong type"),
])
def test_bad_settings_are_refused_early(raw, message):
    with pytest.raises(LrqatError, match=message):
        RunSpec.from_dict(raw).validate()


@pytest.mark.parametrize("family", ["gemma2", "phi3", "qwen3", "mistral"])
def test_activation_and_kv_quantizers_hook_into_other_families(family):
    """No block is re-implemented: the same hooks and attention wrapper serve every family
    (Gemma 2 through its eager soft-capping attention, Phi-3 through its fused qkv_proj)."""
    from transformers import Gemma2Config, MistralConfig, Phi3Config, Qwen3Config

    common = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    config = {"gemma2": lambda: Gemma2Config(**common, head_dim=12),
              "phi3": lambda: Phi3Config(**common, pad_token_id=0),
              "qwen3": lambda: Qwen3Config(**common, head_dim=16),
              "mistral": lambda: MistralConfig(**common)}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 96, (2, 10))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        reference = model(ids).logits
        install(model, ActSpec(8, 4), linears)
        quantized = model(ids).logits
    per_block = len(placements(model)) // config.num_hidden_layers
    assert per_block == len(linears) // config.num_hidden_layers + 3  # every linear input, Q, K, V
    assert not torch.equal(quantized, reference) and relative_error(quantized, reference) < 0.5
    remove(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()
