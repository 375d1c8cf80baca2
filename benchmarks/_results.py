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

    return f"{platform.machine()}, {platform.processor() or 'cpu'}, {platform.system()}, {os.cpu_count()} cores"


def command() -> str:
    """The exact command that produced a result."""
    return "python " + " ".join(sys.argv)


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
