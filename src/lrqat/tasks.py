"""Zero-shot task accuracy through lm-eval-harness, offline.

No registry ships HellaSwag, PIQA, ARC, WinoGrande, BoolQ or LAMBADA and there is no hub
here, so lrqat builds two small tasks from text it already installs, and lm-eval runs
them from local files like any task of its own (`TaskManager(include_path=...)`):

- `lrqat_lambada` (LAMBADA-style): predict the last word of a passage. Passages are runs
  of whole sentences (40-120 words) from the *held-out* documents of the corpus (the
  same document-level split training never reads), cut so that they end on a lowercase word of at
  least three letters; the final punctuation is dropped. Field `text`, as in LAMBADA;
  metric `acc` (the target is the greedy continuation) and perplexity of the target.
- `lrqat_hellaswag` (HellaSwag-style): choose the true next sentence after a context of
  two or three sentences, among it and three sentences drawn from *other* held-out
  documents (similar length, fixed seed). Fields `ctx`, `endings`, `label`,
  `activity_label` as in HellaSwag; metrics `acc` and `acc_norm` (by byte length).

Both are deterministic for a given corpus and split. Because the fields are the real
datasets', `--tasks hellaswag,arc_easy,lambada_openai,...` name lm-eval's own tasks
unchanged wherever the hub is reachable (not tested here).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lrqat.data import load_documents, split_documents
from lrqat.errors import LrqatError
from lrqat.models import cache_root

LOCAL_TASKS = ("lrqat_lambada", "lrqat_hellaswag")
TASK_METRICS = ("acc", "acc_norm")
_SENTENCE_END = re.compile(r'(?<=[.!?])["\')\]]*\s+(?=["\'(\[]?[A-Z])')
_LAST_WORD = re.compile(r"^(.*\s)([a-z]{3,})[.!?]?[\"')\]]*$", re.DOTALL)


def parse_tasks(text: str) -> list[str]:
    """`local` means lrqat's two offline tasks; any other name is passed to lm-eval."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    expanded = [task for n in names for task in (LOCAL_TASKS if n == "local" else (n,))]
    if not expanded:
        raise LrqatError("--tasks names no task: pass e.g. local, lrqat_lambada or hellaswag.")
    return list(dict.fromkeys(expanded))


def sentences(text: str) -> list[str]:
    out = []
    for paragraph in text.split("\n\n"):
        out += [s.strip() for s in _SENTENCE_END.split(" ".join(paragraph.split())) if s.strip()]
    return out


def _order(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def lambada_docs(held_out: dict[str, list[str]], count: int) -> list[dict[str, Any]]:
    docs = []
    for doc_id in sorted(held_out, key=_order):
        passage: list[str] = []
        for sentence in held_out[doc_id]:
            passage.append(sentence)
            words = sum(len(s.split()) for s in passage)
            if words < 40:
                continue
            match = _LAST_WORD.match(" ".join(passage))
            if words <= 120 and match:
                docs.append({"text": (match.group(1) + match.group(2)).strip(), "doc": doc_id})
            passage = []
    return sorted(docs, key=lambda d: _order(d["text"]))[:count]


def hellaswag_docs(held_out: dict[str, list[str]], count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    pool = [(doc_id, s) for doc_id, sents in held_out.items() for s in sents if 6 <= len(s.split()) <= 40]
    docs = []
    for doc_id in sorted(held_out, key=_order):
        sents = held_out[doc_id]
        for start in range(0, len(sents) - 3, 6):  # contexts spread over the document
            ctx, true = sents[start:start + 3], sents[start + 3]
            if not 6 <= len(true.split()) <= 40:
                continue
            length = len(true.split())
            others = [s for other, s in pool if other != doc_id and abs(len(s.split()) - length) <= max(3, length // 3)]
            if len(others) < 3:
                continue
            endings = [*rng.sample(others, 3)]
            label = rng.randrange(4)
            endings.insert(label, true)
            docs.append({"ctx": " ".join(ctx), "ctx_a": " ".join(ctx), "ctx_b": "", "endings": endings,
                         "label": str(label), "activity_label": doc_id.split("/")[-1][:2], "doc": doc_id})
    return sorted(docs, key=lambda d: _order(d["ctx"]))[:count]


_YAML = {
    "lrqat_lambada": """task: lrqat_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "lrqat_hellaswag": """task: lrqat_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
}


def build_local_tasks(source: str = "brown", eval_fraction: float = 0.1, count: int = 500) -> Path:
    """Write the two local tasks (data and lm-eval YAML) for the held-out documents of
    `source`; returns the folder lm-eval includes. Rebuilt only when missing."""
    key = _order(f"{source}|{eval_fraction}|{count}|v2")[:12]
    folder = cache_root() / "tasks" / key
    if all((folder / f"{name}.yaml").is_file() for name in LOCAL_TASKS):
        return folder
    _, evals = split_documents(load_documents(source), eval_fraction)
    held_out = {d.id: sentences(d.text) for d in evals}
    built = {"lrqat_lambada": lambada_docs(held_out, count), "lrqat_hellaswag": hellaswag_docs(held_out, count)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in built.items():
        if len(docs) < 20:
            raise LrqatError(f"the held-out split of {source!r} yields only {len(docs)} {name} examples: use a larger "
                             "corpus (or a larger eval fraction) for task accuracy.")
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(_YAML[name].format(file=json.dumps(str(data))))
    return folder


def task_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: list[str], limit: int | None,
                  source: str = "brown", eval_fraction: float = 0.1, batch_size: int = 8,
                  max_length: int = 1024) -> dict[str, dict[str, float]]:
    """Zero-shot `acc` and `acc_norm` (where the task has it) of `model` as it is held in
    memory (quantized layers and all), by lm-eval's HFLM; `limit` examples per task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    include = build_local_tasks(source, eval_fraction) if any(t in LOCAL_TASKS for t in tasks) else None
    manager = _task_manager(str(include) if include else None, not set(tasks) <= set(LOCAL_TASKS))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LrqatError(f"unknown task {', '.join(unknown)}: use local ({', '.join(LOCAL_TASKS)}) or a task lm-eval "
                         "knows (e.g. hellaswag, which needs the Hugging Face hub).")
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=str(device))
    with torch.no_grad():
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=0,
                              bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0, verbosity="ERROR")
    model.train(was_training)
    return {task: {metric: float(out["results"][task][f"{metric},none"]) for metric in TASK_METRICS
                   if f"{metric},none" in out["results"][task]} for task in tasks}


@functools.cache
def _task_manager(include: str | None, lm_eval_tasks: bool) -> Any:
    """lm-eval's task index, built once per process: indexing lm-eval's own ~14,000 task
    files takes seconds (half a minute on 2 busy cores), and lrqat's local tasks need
    none of them, so they are indexed only when a task outside the local ones is named."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=lm_eval_tasks)


def accuracy_recovered(float_acc: float, rtn_acc: float, acc: float) -> float | None:
    """Like G: the share of RTN's accuracy loss a method wins back (None when RTN lost none)."""
    return None if abs(float_acc - rtn_acc) < 1e-12 else (acc - rtn_acc) / (float_acc - rtn_acc)


TaskScorer = Callable[[str, nn.Module], None]
