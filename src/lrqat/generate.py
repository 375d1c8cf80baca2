"""`lrqat generate`: text from a merged integer model, straight from its packed storage."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lrqat.errors import LrqatError
from lrqat.export.formats import merged_model_dir


def generate(run: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, chat: bool = False, seed: int = 0) -> str:
    """Continue `prompt` (greedy unless `temperature > 0`); returns only the new text."""
    if not prompt.strip():
        raise LrqatError("the prompt is empty: give --prompt some text to continue.")
    if max_new_tokens <= 0:
        raise LrqatError(f"--max-new-tokens {max_new_tokens} must be a positive number of tokens.")
    if not math.isfinite(temperature) or temperature < 0:
        raise LrqatError(f"--temperature {temperature} must be >= 0 (0: greedy).")
    from lrqat.export.native import load_quantized
    from lrqat.models import load_tokenizer

    source = merged_model_dir(run)
    tokenizer = load_tokenizer(source)
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
