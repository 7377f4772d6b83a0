"""jq: quantization for JAX/Flax — pure functions over parameter pytrees.

    import jq
    cfg = jq.load_recipe("rtn_w4_g128")                 # a shipped recipe, or any YAML path
    qparams = jq.quantize_params(params, cfg)           # same tree, QTensors at quantized leaves
    logits = jq.apply(model, {"params": qparams}, tokens)   # the unmodified linen model (NNX: jq.nnx_merge)
    qparams, log = jq.quantize_model(model, params, cfg, calib_tokens)   # GPTQ & co. on any linen / NNX model

Where things live (each layer imports only the ones above it in this list):

    jq.numbers      formats, packing, QTensor and its Layout, schemes, range estimators, Hadamard, KV-cache arrays
    jq.algorithms   one file per method (rtn, gptq, hqq, awq, smoothquant), their registry and statistics
    jq.tree         recipes (YAML rules), quantize_params / dequantize_params, leaf paths, reports
    jq.ops          qdot_general / qeinsum with the kernel registry; jq.pallas_kernels register into it
    jq.interop      unmodified linen / NNX models on quantized trees; jq.calibration, jq.qat, jq.adapters (LoRA /
                    QLoRA, LoftQ, QA-LoRA, LoRC, PEQA on quantized bases), jq.checkpoint
    jq.models       the ModelFamily record and registry, one package per family, file readers
    jq.apps         pipeline, convert, generate, fine-tuning, the CLI
"""

from jq import algorithms, ops
from jq._version import __version__
from jq.numbers import formats, ranges
from jq.numbers.formats import FORMATS, get_format
from jq.numbers.lowrank import LowRank
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme
from jq.algorithms.stats import LayerStats, Stats
from jq.tree.paths import leaf_paths
from jq.types import Params
from jq.tree.quantize import dequantize_params, quantize_params
from jq.tree.recipe import DEFAULT_IGNORE, QuantConfig, Rule, load_recipe, recipe_from_dict
from jq.tree.report import format_report, report, size_summary

__all__ = [
    "DEFAULT_IGNORE", "FORMATS", "LayerStats", "Layout", "LowRank", "Params", "QTensor", "QuantConfig", "Rule",
    "Scheme", "Stats", "__version__", "adapters", "algorithms",
    "apply", "dequantize_params", "format_report", "formats", "get_format", "interop", "leaf_paths", "load_recipe",
    "nnx_merge", "ops", "quantize_model", "quantize_params", "ranges", "recipe_from_dict", "report", "routing_report",
    "size_summary", "trace_usage",
]

_INTEROP = ("interop", "apply", "nnx_merge", "trace_usage", "routing_report")


def __getattr__(name: str):
    # jq.interop imports Flax; keep `import jq` light for users of the array-level API only.
    if name in _INTEROP:
        import importlib

        interop = importlib.import_module("jq.interop")
        return interop if name == "interop" else getattr(interop, name)
    if name == "adapters":  # imports Flax and Optax, like jq.interop
        import importlib

        return importlib.import_module("jq.adapters")
    if name == "quantize_model":  # calibrated quantization of any linen or NNX model (blocks, traced, one shot)
        import importlib

        return importlib.import_module("jq.calibration.model").quantize_model
    raise AttributeError(f"module 'jq' has no attribute {name!r}")
