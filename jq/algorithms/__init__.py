"""Quantization algorithms: one file per method, each a pure function of arrays (and statistics) → QTensor.

A method has the signature `method(w, scheme, layout, stats=None, **options) -> QTensor`, where `w` is the float
weight in its logical shape, `layout` the validated `Layout` (contraction axes, groups), and `stats` the
calibration statistics for this weight (None for data-free methods). `register` puts it in `METHODS`, which is
what recipes name. Methods never import Flax, Optax, Orbax or models.
"""

from jq.algorithms import awq, gptq, hqq, rtn, smoothquant  # noqa: F401  (each registers its methods)
from jq.algorithms.registry import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register", "awq", "gptq", "hqq", "rtn", "smoothquant"]
