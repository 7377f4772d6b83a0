"""jq: quantization for JAX/Flax — pure functions over parameter pytrees.

    import jq
    cfg = jq.load_recipe("configs/rtn_w4_g128.yaml")
    qparams = jq.quantize_params(params, cfg)          # same tree, QTensors at quantized leaves
    logits = jq.flax.apply(model, {"params": qparams}, tokens)
"""

from jq import algorithms, formats, ops, ranges
from jq.config import DEFAULT_IGNORE, QuantConfig, Rule, load_recipe, recipe_from_dict
from jq.formats import FORMATS, get_format
from jq.qtensor import Layout, QTensor
from jq.quantize import dequantize_params, format_report, leaf_paths, quantize_params, report
from jq.scheme import Scheme

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_IGNORE", "FORMATS", "Layout", "QTensor", "QuantConfig", "Rule", "Scheme", "algorithms",
    "dequantize_params", "format_report", "formats", "get_format", "leaf_paths", "load_recipe", "ops",
    "quantize_params", "ranges", "recipe_from_dict", "report",
]


def __getattr__(name):
    # jq.flax imports Flax; keep `import jq` light for users of the array-level API only.
    if name == "flax":
        import importlib

        return importlib.import_module("jq.flax")
    raise AttributeError(f"module 'jq' has no attribute {name!r}")
