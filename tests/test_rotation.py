"""Hadamard rotations: the matrices, computational invariance on every supported family
and on the built-in model, refusals, and exports of rotated models by their loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from lrqat.activations import ActSpec, placements
from lrqat.errors import LrqatError
from lrqat.export.formats import export
from lrqat.export.native import load_quantized
from lrqat.hadamard import HadamardTransform, dense_factor, factorize
from lrqat.online import apply_online, prepare
from lrqat.rotation import RotationRecord, check_rotatable, rotate_model
from test_activations import IDS, merged_with


@pytest.mark.parametrize(("n", "m"), [(64, 1), (576, 36), (896, 28), (1536, 12), (4864, 76), (11008, 344),
                                      (13824, 108), (5120, 20), (100, 100)])
def test_hadamard_sizes_of_real_models_factor_into_a_built_matrix(n, m):
    assert factorize(n) == (m, n // m)
    H = dense_factor(m)
    assert np.array_equal(H @ H.T, m * np.eye(m, dtype=np.int64))  # built by Paley, checked


@pytest.mark.parametrize("n", [48, 576, 1536])
@pytest.mark.parametrize("seed", [None, 3])
def test_fast_transform_is_the_orthogonal_kronecker_product(n, seed):
    transform = HadamardTransform(n, seed=seed)
    Q = transform.matrix()
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    m, p = factorize(n)
    H = torch.kron(torch.from_numpy(dense_factor(m).astype(np.float64)),
                   torch.from_numpy(dense_factor(2).astype(np.float64)) if p == 2 else
                   HadamardTransform(p).matrix() * p**0.5)
    signs = torch.ones(n, dtype=torch.float64) if transform.signs is None else transform.signs
    assert torch.allclose(Q, torch.diag(signs) @ H / n**0.5, atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(transform(x), x @ Q, atol=1e-12)


@pytest.mark.parametrize("n", [6, 10, 14, 0])
def test_sizes_without_a_hadamard_matrix_are_refused(n):
    with pytest.raises(LrqatError, match="--rotate none"):
        factorize(n)


COMMON = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
FAMILIES = {
    "llama-tied": (LlamaConfig, {"tie_word_embeddings": True}),
    "qwen2-bias": (Qwen2Config, {"tie_word_embeddings": False}),
    "qwen3-qk-norm": (Qwen3Config, {"head_dim": 16}),
    "mistral": (MistralConfig, {"tie_word_embeddings": False}),
}


def random_model(cls, extra, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**COMMON, **extra)).float().eval()
    with torch.no_grad():  # norms far from one, biases non-zero: what folding must get right
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("online", [False, True], ids=["r1r2", "r1r2r3r4"])
def test_rotated_float_model_computes_the_original_logits(family, online):
    model = random_model(*FAMILIES[family])
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        record = rotate_model(model, seed=1, online_down_proj=online, online_qk=online)
        apply_online(model, ActSpec(), record, [])
        rotated = model(ids).logits
    assert relative(rotated, reference) < 1e-5
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # folded final norm: untied
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if n.endswith("layernorm.weight"))


@pytest.mark.slow
def test_rotation_leaves_the_built_in_model_unchanged():
    from lrqat.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer("The jury said it did find that many of Georgia's registration laws are outmoded.",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits
        prepare(model, ActSpec(), "hadamard", 0, [])
        r1r2 = model(ids).logits
        rotate_model(model, seed=0, online_down_proj=True, online_qk=True)  # a second rotation, online halves too
        apply_online(model, ActSpec(), RotationRecord("hadamard", True, True), [])
        all_four = model(ids).logits
    assert relative(r1r2, reference) < 1e-5 and relative(all_four, reference) < 1e-5


def test_rotation_makes_4_bit_activations_closer_to_float():
    """The point of R1–R4: an outlier channel sets a token's 4-bit grid; rotated, the
    outlier spreads over all channels and the error drops several-fold (3.7x here)."""
    from lrqat.activations import fake_quantize_per_token

    torch.manual_seed(0)
    x = torch.randn(64, 576, dtype=torch.float64)
    x[:, 7] *= 50  # activations of trained LLMs carry a few such channels
    rotation = HadamardTransform(576, seed=0)
    Q = rotation.matrix()
    plain = relative(fake_quantize_per_token(x, 4), x)
    rotated = relative(fake_quantize_per_token(rotation(x), 4) @ Q.T, x)
    assert rotated < 0.4 * plain


@pytest.mark.parametrize(("config", "message"), [
    (Gemma2Config(**COMMON, head_dim=12), "norms after a sub-block"),
    (Phi3Config(**COMMON, pad_token_id=0), "fuses or lacks"),
    (LlamaConfig(**{**COMMON, "hidden_size": 24, "num_attention_heads": 4}), "head dimension 6"),
    (LlamaConfig(**{**COMMON, "intermediate_size": 90}), "intermediate size 90"),
])
def test_models_the_rotation_cannot_take_are_refused_by_name(config, message):
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(LrqatError, match=message):
        check_rotatable(model)


def test_rotated_weight_only_model_is_plain_and_runs_in_llama_cpp(tmp_path, tiny_model_dir):
    """R1/R2 live in the weights: the GGUF of a rotated W4 model is an ordinary Llama file."""
    from llama_cpp import Llama

    merged_with(tiny_model_dir, tmp_path, ActSpec(), "hadamard")
    ours = load_quantized(tmp_path / "model")
    assert placements(ours) == [] and ours.config._attn_implementation == "sdpa"
    export(tmp_path, "gguf")
    llm = Llama(model_path=str(tmp_path / "export" / "gguf" / "model.gguf"), n_ctx=64, logits_all=True,
                verbose=False, n_threads=2)
    ids = IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        expected = ours(IDS).logits[0]
    assert ((theirs - expected).abs().max() / expected.abs().max()).item() < 0.05
    assert (theirs.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


def test_rotated_weight_only_model_exports_to_compressed_tensors(tmp_path, tiny_model_dir):
    merged_with(tiny_model_dir, tmp_path, ActSpec(), "hadamard")
    export(tmp_path, "compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "compressed-tensors", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(theirs(IDS).logits, load_quantized(tmp_path / "model")(IDS).logits)
