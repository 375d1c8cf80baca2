"""A run folder and its results, as types.

`RunDir` owns every file name of a run: the pipeline, the trainer's caller, report,
compare, export, generate and the benchmarks all ask it rather than spelling names.
`RunResult` is `results.json` typed, with the gap metric derived, not stored twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrqat.checkpoint import CHECKPOINT_NAME, atomic_write_text


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder (`lrqat quantize --output ROOT`)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def settings(self) -> Path:
        """The run's settings as given (`run.json`): a resumed run must match them."""
        return self.root / "run.json"

    @property
    def stages(self) -> Path:
        """Finished evaluations (`stages.json`), so a resumed run skips them."""
        return self.root / "stages.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_NAME

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def model(self) -> Path:
        """The merged integer model (lrqat's own format)."""
        return self.root / "model"

    def export(self, fmt: str) -> Path:
        """Default destination of an export in format `fmt`."""
        return self.root / "export" / fmt

    def method_run(self, method: str) -> RunDir:
        """The run of one method inside a comparison folder."""
        return RunDir(self.root / method)

    @property
    def compare_json(self) -> Path:
        return self.root / "compare.json"

    @property
    def compare_md(self) -> Path:
        return self.root / "compare.md"

    @property
    def compare_png(self) -> Path:
        return self.root / "compare.png"

    def holds_run(self) -> bool:
        return self.checkpoint.exists() or self.stages.exists()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines()]

    def read_stages(self) -> dict[str, Any]:
        return json.loads(self.stages.read_text()) if self.stages.exists() else {}

    def write_stages(self, values: dict[str, Any]) -> None:
        atomic_write_text(self.stages, strict_json(values, indent=2))

    def read_result(self) -> RunResult:
        return RunResult.from_dict(json.loads(self.results.read_text()))


@dataclass
class RunResult:
    """What one run measured (`results.json`)."""

    model: str
    data: str
    method: str
    spec: dict[str, Any]  # the resolved settings (the fingerprint)
    eval_tokens: int
    context: int
    # float, rtn, ptq (the PTQ start: GPTQ with --init gptq, else RTN), METHOD, METHOD_merged
    ppl: dict[str, float]
    merged_vs_training_rel_diff: float
    rtn_tie_differences: int
    trainable_params: int
    processes: int
    sharding: str
    distributed: str
    train: dict[str, Any]
    model_dir: str  # "" for a reference method that saves no integer model (float-lora)
    exports: list[dict[str, Any]] = field(default_factory=list)
    # the same perplexities on the --eval-data corpus (empty without one)
    ppl_ood: dict[str, float] = field(default_factory=dict)
    eval_data: str | None = None
    eval_data_tokens: int = 0
    # seconds and peak resident memory (MiB; GPU: peak allocated) of each phase of the run
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    # zero-shot accuracy by model (float, rtn, METHOD_merged, ...) → task → metric (acc, acc_norm)
    tasks: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    @property
    def ppl_merged(self) -> float:
        return self.ppl[f"{self.method}_merged"]

    @property
    def gap_recovered(self) -> float | None:
        """G = (ppl_rtn − ppl_merged) / (ppl_rtn − ppl_float): the share of RTN's gap to
        float that the method closes (1 = float quality, 0 = no better than RTN)."""
        return gap_recovered(self.ppl["float"], self.ppl["rtn"], self.ppl_merged)

    @property
    def gaps(self) -> dict[str, float | None]:
        """G against RTN (`g_rtn`) and against GPTQ (`g_gptq`, where GPTQ was evaluated),
        on the held-out split and (`ood_` prefix) on the --eval-data corpus."""
        out: dict[str, float | None] = {}
        for prefix, ppl in (("", self.ppl), ("ood_", self.ppl_ood)):
            merged = ppl.get(f"{self.method}_merged")
            if merged is None:
                continue
            out[f"{prefix}g_rtn"] = gap_recovered(ppl["float"], ppl["rtn"], merged)
            out[f"{prefix}g_gptq"] = gap_recovered(ppl["float"], ppl["gptq"], merged) if "gptq" in ppl else None
        return out

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["gap_recovered"] = self.gap_recovered
        raw["gaps"] = self.gaps
        return raw

    def to_json(self) -> str:
        return strict_json(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def gap_recovered(ppl_float: float, ppl_baseline: float, ppl: float) -> float | None:
    """The gap metric G against a baseline (RTN: `RunResult.gap_recovered`; or GPTQ):
    (ppl_baseline − ppl) / (ppl_baseline − ppl_float); None when the baseline equals float."""
    return (ppl_baseline - ppl) / (ppl_baseline - ppl_float) if ppl_baseline != ppl_float else None


def strict_json(value: Any, indent: int | None = None) -> str:
    """JSON without NaN or infinity (which are not JSON): non-finite numbers become null."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value
