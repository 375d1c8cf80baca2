"""lrqat: low-rank quantization-aware training (LR-QAT) of large language models.

The Python API in one screen:

    from lrqat import RunSpec, QuantSpec, run_quantize
    results = run_quantize(RunSpec(quant=QuantSpec(bits=4), output="runs/w4"))

or step by step with `load_model`, `apply_lrqat`, `train`, `merge_model`,
`perplexity` and `save_quantized`.
"""

from lrqat.errors import LrqatError
from lrqat.evaluate import perplexity
from lrqat.export.native import load_quantized, save_quantized
from lrqat.layers import LRQATLinear, QuantLinear
from lrqat.methods import apply_lrqat, apply_rtn
from lrqat.models import load_model
from lrqat.pipeline import run_quantize
from lrqat.spec import DataSpec, LRQATSpec, QuantSpec, RunSpec, TrainSpec
from lrqat.surgery import merge_model
from lrqat.train import train

__all__ = [
    "DataSpec", "LRQATLinear", "LRQATSpec", "LrqatError", "QuantLinear", "QuantSpec", "RunSpec", "TrainSpec",
    "apply_lrqat", "apply_rtn", "load_model", "load_quantized", "merge_model", "perplexity", "run_quantize",
    "save_quantized", "train",
]
__version__ = "0.1.0"
