"""Model families as plug-ins: a `ModelFamily` record says everything jq needs to know about one architecture, and
the registry finds it by name, by a GGUF `general.architecture`, by a Hugging Face `model_type` or by its config
type. Loading, calibration, rotation, generation, conversion and fine-tuning use only the record, so adding a
family is one package (its config, module, weight names and calibration blocks) plus one `register_family` line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TensorMap", "ModelFamily", "LoadedModel", "register_family", "get_family", "family_for_gguf",
           "family_for_hf", "family_of", "families", "check_shapes", "config_dict"]

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """Where one stored tensor goes in the family's parameter tree.

    Attributes:
      path: the "/"-joined parameter path (`layers_0/attn/q_proj/kernel`).
      transpose: a linear weight stored (out, in), as GGUF and Hugging Face files do, becomes a Flax kernel (in, out).
      convert: applied to the fp32 NumPy array (in stored order) before the transpose, e.g. undoing llama.cpp's
        q/k row interleaving.
    """

    path: str
    transpose: bool = False
    convert: Callable[[np.ndarray], np.ndarray] | None = None

    def apply(self, w: np.ndarray) -> np.ndarray:
        """The stored array (fp32, stored order) as the parameter."""
        if self.convert is not None:
            w = self.convert(w)
        return np.ascontiguousarray(w.T) if self.transpose else w


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One architecture: how to read it, build it, calibrate it, rotate it and decode with it.

    Required:
      name: the family's name ("llama", "bert").
      config_type: the class of its configs (a frozen dataclass); `family_of(cfg)` finds the family from it.
      module: `module(cfg, dtype=jnp.float32, kv_cache=None) -> flax.linen.Module` whose params are the family's tree.
      expected_shapes: `cfg -> {path: shape}`, every parameter of `module(cfg)`.

    Readers (each optional; a family without them cannot be loaded from that kind of file):
      gguf_architectures / config_from_gguf(meta, tensor_names) / gguf_tensor(name, cfg) -> TensorMap | None (None:
        not a parameter; raise ValueError naming the tensor for one the family does not know).
      hf_model_types / config_from_hf(config_json, source) / hf_tensor(name, cfg) -> TensorMap | None.

    Capabilities (optional):
      causal_lm: `module(cfg)(tokens [B, T]) -> logits [B, T, V]`, so perplexity and generation apply.
      block_spec: `(cfg, dtype) -> jq.calibration.BlockSpec`, for calibrated recipes (GPTQ, AWQ, SmoothQuant).
      rotate: `(params, cfg, RotationConfig) -> (params, cfg)`, a function-preserving QuaRot rotation.
      smooth_attention: `(params, cfg, SmoothAttentionConfig, calib [S, T]) -> (params, info)`, QoQ's SmoothAttention.
      init_cache / make_decode / cache_bytes_per_token: KV-cache decoding (`jq.apps.generate`), signatures as in
        `jq.models.llama.model`.
      derived_fields: config fields a rotation may change (Llama's unties the LM head); every other field of a
        quantized checkpoint's stored config must match the model it is run with.

    Configs are frozen dataclasses; a causal LM's config names its context length `max_seq_len`.
    """

    name: str
    config_type: type
    module: Callable[..., Any]
    expected_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    gguf_architectures: tuple[str, ...] = ()
    config_from_gguf: Callable[[Mapping[str, Any], set[str]], Any] | None = None
    gguf_tensor: Callable[[str, Any], TensorMap | None] | None = None
    hf_model_types: tuple[str, ...] = ()
    config_from_hf: Callable[[Mapping[str, Any], str], Any] | None = None
    hf_tensor: Callable[[str, Any], TensorMap | None] | None = None
    causal_lm: bool = True
    block_spec: Callable[..., Any] | None = None
    rotate: Callable[..., tuple[Params, Any]] | None = None
    smooth_attention: Callable[..., tuple[Params, Any]] | None = None
    init_cache: Callable[..., Any] | None = None
    make_decode: Callable[..., Any] | None = None
    cache_bytes_per_token: Callable[..., int] | None = None
    derived_fields: tuple[str, ...] = ()

    def needs(self, capability: str, what: str) -> Callable[..., Any]:
        """The capability `capability` ("block_spec", "rotate", "make_decode", ...), or a ValueError saying that
        this family lacks it and that `what` needs it."""
        fn = getattr(self, capability)
        if fn is None:
            raise ValueError(f"model family {self.name!r} has no {capability}, which {what} needs; give its "
                             f"ModelFamily a {capability} (jq.models.family) or choose another recipe / command")
        return fn


@dataclasses.dataclass
class LoadedModel:
    """A model read from a file or a known name: its family, config, parameter tree (fp32 arrays; QTensors where it
    was read natively), tokenizer (None when the source has none), where it came from, and `native`: for a native
    read, how each stored tensor type arrived ({type: {"tensors", "as": "QTensor int4 ..." | "dequantized"}})."""

    family: ModelFamily
    cfg: Any
    params: Params
    tokenizer: Any
    source: str
    native: dict[str, Any] | None = None


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add `family` to the registry (its name, GGUF architectures and HF model types must be new)."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    for other in _FAMILIES.values():
        clash = set(other.gguf_architectures) & set(family.gguf_architectures) or \
            set(other.hf_model_types) & set(family.hf_model_types)
        if clash or other.config_type is family.config_type:
            raise ValueError(f"model family {family.name!r} claims {sorted(clash) or family.config_type.__name__}, "
                             f"which family {other.name!r} already has")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, ModelFamily]:
    """The registered families by name."""
    return dict(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The registered family `name`; ValueError naming the registered ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}") from None


def _claimed(field: str, key: Any, what: str) -> ModelFamily:
    """The family whose `field` (a tuple of names) holds `key`; else a ValueError naming `what` and the known names."""
    for f in _FAMILIES.values():
        if key in getattr(f, field):
            return f
    known = sorted(k for f in _FAMILIES.values() for k in getattr(f, field))
    raise ValueError(f"unsupported {what} {key!r}: jq reads {known} (a family registers more with "
                     "jq.models.register_family)")


def family_for_gguf(arch: Any) -> ModelFamily:
    """The family of a GGUF file's `general.architecture`."""
    return _claimed("gguf_architectures", arch, "GGUF architecture")


def family_for_hf(model_type: Any, source: str = "config.json") -> ModelFamily:
    """The family of a Hugging Face config's `model_type` (`source` names the file in the error)."""
    return _claimed("hf_model_types", model_type, f"Hugging Face model_type (in {source})")


def family_of(cfg: Any) -> ModelFamily:
    """The family whose config type `cfg` is."""
    for f in _FAMILIES.values():
        if isinstance(cfg, f.config_type):
            return f
    raise ValueError(f"{type(cfg).__name__} is the config of no registered model family ({sorted(_FAMILIES)})")


def check_shapes(family: ModelFamily, cfg: Any, shapes: Mapping[str, tuple[int, ...]], source: str | Path) -> None:
    """Raise ValueError naming `source` if a parameter of `family.module(cfg)` is missing from `shapes` ({path:
    shape}) or has another shape."""
    for path, shape in family.expected_shapes(cfg).items():
        if path not in shapes:
            raise ValueError(f"{source}: missing weight for parameter {path}")
        if tuple(shapes[path]) != tuple(shape):
            raise ValueError(f"{source}: parameter {path} has shape {tuple(shapes[path])}, expected {tuple(shape)}")


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config as JSON-ready fields (what checkpoints store as `model_config`)."""
    return dataclasses.asdict(cfg)
