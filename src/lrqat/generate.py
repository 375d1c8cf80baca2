"""`lrqat generate`: text from a merged integer model, straight from its packed storage."""

from __future__ import annotations

from pathlib import Path

import torch

from lrqat.export.formats import merged_model_dir


def generate(run: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, chat: bool = False, seed: int = 0) -> str:
    """Continue `prompt` (greedy unless `temperature > 0`); returns only the new text."""
    from transformers import AutoTokenizer

    from lrqat.export.native import load_quantized

    source = merged_model_dir(run)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = load_quantized(source)
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
