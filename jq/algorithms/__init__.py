"""Quantization algorithms (layer 2): functions of arrays and statistics → QTensor, and the records that compose them.

- methods, one file each, registered by the name recipes give: `rtn` (and `qat`), `hqq`, `gptq`, `awq_clip`,
  `kmeans` (learned scalar / vector codebooks), `gptvq` (vector codebooks under GPTQ's error feedback), `higgs`
  (data-free Gaussian grids after a rotation), `quip` (the fixed E8P lattice with block-LDL feedback), `aqlm`
  (additive codebooks: sums of M learned vectors, beam search + least squares); a method
  record has `quantize(w, scheme, layout, stats=None) -> QTensor` (`registry`);
- grid fitters any method can take (`grids.RangeFit`, `hqq.HQQFit`), GPTQ's `refit.LeastSquaresRefit`;
- transforms (`transforms`: AWQ and SmoothQuant scales) folded into the model before quantization;
- `stats.LayerStats`: the calibration statistics methods read.

"GPTQ with HQQ grids and a least-squares refit" is `GPTQ(grid=HQQFit(p=1), refit=LeastSquaresRefit())` — a recipe
writes it `method: gptq, options: {hqq: {p: 1}, refit: true}`. Algorithms never import Flax, Optax, Orbax or models.
"""

from jq.algorithms import (aqlm, awq, gptq, gptvq, higgs, hqq, kmeans, quip, rtn,  # noqa: F401  (each registers
                           smoothquant, transforms)  # itself)
from jq.algorithms.aqlm import AQLM
from jq.algorithms.grids import GridFitter, RangeFit
from jq.algorithms.gptq import GPTQ
from jq.algorithms.gptvq import GPTVQ
from jq.algorithms.hqq import HQQFit
from jq.algorithms.kmeans import KMeans
from jq.algorithms.quip import QuIP
from jq.algorithms.refit import LeastSquaresRefit
from jq.algorithms.registry import (METHODS, TRANSFORMS, Method, MethodSpec, Transform, get_method, get_transform,
                                    register, register_method, register_transform)
from jq.algorithms.rtn import QAT, RTN
from jq.algorithms.stats import LayerStats, StatSums
from jq.algorithms.transforms import AWQScales, SmoothQuantScales

__all__ = ["METHODS", "TRANSFORMS", "Method", "MethodSpec", "get_method", "get_transform", "register",
           "register_method", "register_transform", "Transform", "GridFitter", "RangeFit", "HQQFit", "GPTQ", "GPTVQ",
           "QuIP", "AQLM", "RTN", "QAT", "KMeans",
           "LeastSquaresRefit", "AWQScales", "SmoothQuantScales", "LayerStats", "StatSums"]
