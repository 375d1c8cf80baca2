"""The epilogue every benchmark shares: where results go, how the machine and the
command are recorded, and writing the JSON record beside its Markdown table."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """The machine in a few words (architecture, processor, OS, cores)."""
    import os

    return f"{platform.machine()}, {_processor()}, {platform.system()}, {os.cpu_count()} cores"


def _processor() -> str:
    """The CPU's model name and whether it computes bf16 natively (AMX or AVX-512 BF16),
    which sets how fast bf16 runs: two 2-core x86 machines can differ 50x on it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "cpu"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "cpu")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return f"{name} ({'bf16: ' + ' '.join(native) if native else 'no native bf16'})"


def command() -> str:
    """The exact command that produced a result, quoted so it can be pasted back into a shell."""
    import shlex

    return "python " + shlex.join(sys.argv)


def code_version() -> str:
    """The commit whose code produced a result (with "+changes" when `src/` differs from
    it), so figures measured before and after a fix are told apart."""
    import subprocess

    root = Path(__file__).parent.parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    dirty = git("diff", "--quiet", "HEAD", "--", "src").returncode != 0
    return head.stdout.strip() + ("+changes" if dirty else "")


def write_results(name: str, record: dict[str, Any], table: str) -> None:
    """`results/NAME.json` (the record) and `results/NAME.md` (the table); print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    print(table)


def cells(row: dict, *columns: str | tuple[str, int]) -> str:
    """Table cells of ROW joined by " | ": each column a key (3 decimals) or (key, digits)."""
    return " | ".join(cell(row, c) if isinstance(c, str) else cell(row, *c) for c in columns)


def cell(row: dict, key: str, digits: int = 3) -> str:
    """A table cell: ROW[KEY] with `digits` decimals, ± half of ROW[KEY_spread] where there
    is one (LR-QAT rows over seeds), "n/a" where the value is missing."""
    value = row.get(key)
    if value is None:
        return "n/a"
    spread = row.get(f"{key}_spread")
    return f"{value:.{digits}f}" + (f" ±{spread / 2:.{digits}f}" if spread else "")
