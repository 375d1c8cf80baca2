"""lrqat: low-rank quantization-aware training (LR-QAT) of large language models.

The Python API in one screen:

    from lrqat import RunSpec, QuantSpec, run_quantize
    results = run_quantize(RunSpec(quant=QuantSpec(bits=4), output="runs/w4"))
    print(results.ppl, results.gap_recovered)

or step by step with `load_model`, `apply_lrqat`, `train`, `merge_model`,
`perplexity` and `save_quantized`. The methods are the table `METHODS`.
"""

from lrqat.errors import LrqatError
from lrqat.evaluate import perplexity
from lrqat.export.native import load_quantized, save_quantized
from lrqat.layers import LRQATLinear, QuantLinear
from lrqat.methods import METHODS, Method, apply_lrqat, apply_method, apply_rtn
from lrqat.models import load_model
from lrqat.pipeline import run_quantize
from lrqat.rundir import RunDir, RunResult
from lrqat.spec import DataSpec, LRQATSpec, PTQSpec, QuantSpec, RunSpec, TrainSpec
from lrqat.surgery import merge_model
from lrqat.trainer import train

__all__ = [
    "METHODS", "DataSpec", "LRQATLinear", "LRQATSpec", "LrqatError", "Method", "PTQSpec", "QuantLinear", "QuantSpec",
    "RunDir", "RunResult", "RunSpec", "TrainSpec", "apply_lrqat", "apply_method", "apply_rtn", "load_model",
    "load_quantized", "merge_model", "perplexity", "run_quantize", "save_quantized", "train",
]
__version__ = "0.1.0"
