"""Pallas kernels for matmuls on quantized weights: W4A16, W8A16, W8A8 int8, W8A8 fp8 and learned-codebook lookup
tables (LUT), for GPU (Triton) and TPU (Mosaic), run interpreted on CPU.

Layout of the package (a kernel knows tiles, dtypes and scales — never algorithms, configs or models):

- `common`   where and how kernels run (`kernel_mode`), block fitting, tile dequantization;
- `driver`   the two grid skeletons (GPU: K loop inside the kernel; TPU: K as the last grid axis);
- `w4a16`, `w8a16`, `w8a8` (+ `quantize_rows`), `fp8`, `lut`   one kernel each: a tile function and a wrapper
  (`lut` brings its own two grid skeletons: its tables are blocked unlike any driver operand, and it gathers
  from them by reference on GPU);
- `autotune` block sizes: defaults, timing candidates on the device, the JSON cache;
- `dispatch` which QTensor calls go to which kernel; registers them into `jq.ops.registry` on import;
  `force_interpret`.

Weights are used in jq's stored layout (no prepacking step): the wrappers do the cheap rearrangements in XLA
before the call (splitting x into even / odd columns for int4 or into d planes for codebook vectors, act-order
permutation of x, scale reshapes, unpacking codebook indices to bytes, padding of M). `jq.ops.qdot_general` uses
the kernels by default on GPU and TPU; on CPU only inside `force_interpret()` or with `JQ_KERNELS=interpret`.
"""

from jq.pallas_kernels import autotune, dispatch
from jq.pallas_kernels.common import Blocks, Mode, kernel_mode
from jq.pallas_kernels.dispatch import force_interpret, register
from jq.pallas_kernels.fp8 import fp8_matmul
from jq.pallas_kernels.lut import lut_matmul
from jq.pallas_kernels.w4a16 import w4a16_matmul
from jq.pallas_kernels.w8a8 import quantize_rows, w8a8_int8_matmul
from jq.pallas_kernels.w8a16 import w8a16_matmul

__all__ = [
    "Blocks", "Mode", "autotune", "dispatch", "force_interpret", "register", "fp8_matmul", "kernel_mode", "lut_matmul",
    "quantize_rows", "w4a16_matmul", "w8a16_matmul", "w8a8_int8_matmul",
]

register()  # the kernels register themselves into jq.ops.registry
