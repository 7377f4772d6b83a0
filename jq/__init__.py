"""jq: quantization for JAX/Flax — pure functions over parameter pytrees.

    import jq
    cfg = jq.load_recipe("configs/rtn_w4_g128.yaml")
    qparams = jq.quantize_params(params, cfg)          # same tree, QTensors at quantized leaves
    logits = jq.interop.apply(model, {"params": qparams}, tokens)
"""

from jq import algorithms, ops
from jq.numbers import formats
from jq.numbers import ranges
from jq.tree.recipe import DEFAULT_IGNORE, QuantConfig, Rule, load_recipe, recipe_from_dict
from jq.numbers.formats import FORMATS, get_format
from jq.numbers.qtensor import Layout, QTensor
from jq.tree.quantize import dequantize_params, format_report, leaf_paths, quantize_params, report
from jq.numbers.scheme import Scheme

from jq._version import __version__

__all__ = [
    "DEFAULT_IGNORE", "FORMATS", "Layout", "QTensor", "QuantConfig", "Rule", "Scheme", "algorithms",
    "dequantize_params", "format_report", "formats", "get_format", "leaf_paths", "load_recipe", "ops",
    "quantize_params", "ranges", "recipe_from_dict", "report",
]


_INTEROP = ("interop", "apply", "nnx_merge")


def __getattr__(name):
    # jq.interop imports Flax; keep `import jq` light for users of the array-level API only.
    if name in _INTEROP:
        import importlib

        interop = importlib.import_module("jq.interop")
        return interop if name == "interop" else getattr(interop, name)
    raise AttributeError(f"module 'jq' has no attribute {name!r}")
