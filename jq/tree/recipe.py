"""Recipes: ordered rules mapping parameter paths to a scheme and a method, loadable from YAML.

A leaf's path is its pytree keys joined by "/" (`layers_3/attn/q_proj/kernel`; NNX's trailing `value` is dropped).
For each leaf: a path matching `ignore` stays float (unless a rule with `force: true` matches it); otherwise the
first rule whose regex *fully* matches the path decides; no match leaves the leaf float. `ignore` defaults to
`DEFAULT_IGNORE` — embeddings, norms, biases, the LM head, MoE routers and anything with fewer than two dimensions — so
a recipe that says "all kernels" does not touch them by accident.

YAML form::

    name: rtn_w4_g128
    description: 4-bit asymmetric, groups of 128, round to nearest
    rules:
      - pattern: ".*/kernel"
        method: rtn
        format: int4
        symmetric: false
        group_size: 128
    ignore: [".*lm_head.*"]      # optional; replaces the defaults
    kv_cache:                    # optional: quantize the KV cache (see jq.numbers.kvcache); `rules` may then be []
      format: int4               # int8 | int4
      group_size: 64             # along head_dim; omit for one group per head
      rotate: false              # Hadamard-rotate q and k after RoPE before k is quantized (symmetric: default false)
      keys: token                # token | channel (KIVI: per channel over key_group: 64 positions, open block exact)
    lowrank: {rank: 16}          # optional: LoRC low-rank compensation of every quantized weight (LowRankConfig)
    smooth_attention: {alpha: 0.5}  # optional: QoQ's SmoothAttention, keys' scales into queries (calibrated)
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from jq.algorithms import Method, Transform, get_method, get_transform
from jq.algorithms.smoothattention import SmoothAttentionConfig
from jq.numbers.hadamard import Rotation
from jq.numbers.kvcache import KVCacheConfig
from jq.numbers.scheme import Scheme

__all__ = ["Rule", "QuantConfig", "KVCacheConfig", "DEFAULT_IGNORE", "load_recipe", "recipe_from_dict",
           "recipe_to_dict", "find_recipe", "shipped_recipes"]

DEFAULT_IGNORE: tuple[str, ...] = (
    r"(.*/)?(embed|embedding|embeddings|embed_tokens|wte|wpe|token_embd|embedder|input_embedding)(/.*)?",
    r"(.*/)?lm_head(/.*)?",
    r"(.*/)?(router|gate_inp)(/.*)?",  # mixture-of-experts routers: small, and every routing decision hangs on them
    r"(.*/)?[^/]*norm[^/]*(/.*)?",
    r"(.*/)?bias",
)

_SCHEME_FIELDS = tuple(f.name for f in dataclasses.fields(Scheme))
_RULE_FIELDS = ("pattern", "method", "skip", "force", "options", "transforms")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Leaves whose path fully matches `pattern` are quantized with `scheme` by `method` (or kept float if
    `scheme` is None). `options` build the method's record (`record`); `force` lets the rule reach ignored leaves;
    `transforms` (names and options of registered transforms, `jq.algorithms.registry`) run on the float model
    first. Errors name the rule, the method or transform, and what is allowed."""

    pattern: str
    scheme: Scheme | None
    method: str = "rtn"
    force: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    transforms: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def __post_init__(self):
        try:
            object.__setattr__(self, "_regex", re.compile(self.pattern))
        except re.error as e:
            raise ValueError(f"rule pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        spec = get_method(self.method)  # validates the name against the registry
        try:
            object.__setattr__(self, "_record", spec.build(**dict(self.options)))
        except TypeError as e:
            raise ValueError(f"rule {self.pattern!r}: method {self.method!r} does not take these options "
                             f"({dict(self.options)}): {e}") from None
        object.__setattr__(self, "_transforms", tuple(get_transform(n, **dict(o)) for n, o in self.transforms))

    @property
    def record(self) -> Method:
        """The method record this rule's method name and options build (what `quantize_leaf` runs)."""
        return self._record

    @property
    def transform_records(self) -> tuple[Transform, ...]:
        """The transform records, in order."""
        return self._transforms

    @property
    def needs_calibration(self) -> bool:
        """Whether the rule's transforms or method need calibration statistics."""
        return bool(self.transforms) or get_method(self.method).needs_calibration

    def matches(self, path: str) -> bool:
        """Whether the rule's pattern matches the whole leaf path."""
        return self._regex.fullmatch(path) is not None


@dataclasses.dataclass(frozen=True)
class RotationConfig:
    """A model-level rotation before quantization (QuaRot-style; applied by the model adapter, e.g.
    `jq.models.llama.rotate.rotate`): fold norms and rotate the residual stream by a randomized Hadamard matrix
    (`residual`), rotate v / o per head (`heads`); `seed` draws the random signs."""

    residual: bool = True
    heads: bool = True
    seed: int = 0

    def __post_init__(self):
        for k in ("residual", "heads"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"rotation: '{k}' must be true or false, got {getattr(self, k)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"rotation: 'seed' must be an int, got {self.seed!r}")

    @property
    def residual_rotation(self) -> Rotation | None:
        """The residual stream's rotation: a randomized Hadamard matrix (signs from `seed`), or None."""
        return Rotation(seed=self.seed) if self.residual else None

    @property
    def head_rotation(self) -> Rotation | None:
        """The per-head rotation of v / o: the plain Hadamard matrix, or None."""
        return Rotation() if self.heads else None


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """LoRC / HQQ+-style compensation after quantization (`jq.adapters.lorc`): each quantized weight matching
    `pattern` (not `exclude`) gets rank-`rank` float16 factors of its error W − deq(Q), fitted in the metric of its
    calibration inputs when `weighted` (the recipe then needs calibration data), by plain SVD otherwise."""

    rank: int
    weighted: bool = True
    pattern: str = r".*kernel"
    exclude: str = r".*(embed|lm_head).*"
    damp: float = 0.01

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lowrank: 'rank' must be a positive int (e.g. 16), got {self.rank!r}")
        if not isinstance(self.weighted, bool):
            raise ValueError(f"lowrank: 'weighted' must be true or false, got {self.weighted!r}")
        for k in ("pattern", "exclude"):
            try:
                re.compile(getattr(self, k))
            except (re.error, TypeError) as e:
                raise ValueError(f"lowrank: '{k}' {getattr(self, k)!r} is not a regular expression: {e}") from None


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """An ordered list of rules plus the ignore list. Hashable, so it can be a static jit argument.
    `kv_cache` (optional) is how a model quantizes its key/value cache; weight quantization ignores it."""

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    name: str = "custom"
    description: str = ""
    kv_cache: KVCacheConfig | None = None
    rotation: RotationConfig | None = None
    lowrank: LowRankConfig | None = None
    smooth_attention: SmoothAttentionConfig | None = None

    def __post_init__(self):
        for p in self.ignore:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"ignore pattern {p!r} is not a valid regular expression: {e}") from None

    def ignored(self, path: str, ndim: int) -> bool:
        """Whether the leaf stays float regardless of rules: fewer than 2 dims, or an `ignore` pattern matches."""
        return ndim < 2 or any(re.fullmatch(p, path) for p in self.ignore)

    def rule_for(self, path: str, ndim: int) -> Rule | None:
        """The rule that decides this leaf, or None (stay float)."""
        ignored = self.ignored(path, ndim)
        for r in self.rules:
            if r.matches(path) and (r.force or not ignored):
                return r
        return None

    @property
    def needs_calibration(self) -> bool:
        """Whether any rule needs statistics from running the model (a calibrated method or a transform), or the
        `lowrank` section weights its fit by the layer inputs, or the recipe has `smooth_attention`."""
        return self.rules_need_calibration or (self.lowrank is not None and self.lowrank.weighted) or (
            self.smooth_attention is not None)

    @property
    def rules_need_calibration(self) -> bool:
        """Whether a rule's method or transform needs statistics (calibrated quantization, not only `lowrank`)."""
        return any(r.scheme is not None and r.needs_calibration for r in self.rules)

    @classmethod
    def simple(cls, scheme: Scheme, pattern: str = r".*kernel", method: str = "rtn", **kw) -> "QuantConfig":
        """One rule for every kernel (the common case): `QuantConfig.simple(Scheme("int4", group_size=128))`."""
        return cls(rules=(Rule(pattern, scheme, method),), **kw)


def recipe_from_dict(d: dict, source: str = "<dict>") -> QuantConfig:
    """Build and validate a config from a YAML-shaped dict. Errors name the source, the rule and the field."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: a recipe must be a mapping with 'rules', got {type(d).__name__}")
    top = {"name", "description", "rules", "ignore", "defaults", "kv_cache", "rotation", "lowrank", "smooth_attention"}
    unknown = set(d) - top
    if unknown:
        raise ValueError(f"{source}: unknown top-level field(s) {sorted(unknown)}; allowed fields are {sorted(top)}")
    defaults = d.get("defaults") or {}
    rules_in = d.get("rules")
    kv_cache = _parse_kv_cache(d["kv_cache"], source) if d.get("kv_cache") is not None else None
    if kv_cache is not None and rules_in in (None, []):
        rules_in = []  # a KV-cache-only recipe: weights stay float
    elif not rules_in or not isinstance(rules_in, list):
        raise ValueError(f"{source}: 'rules' must be a non-empty list of rules, got {rules_in!r} (only a recipe "
                         "with a 'kv_cache' mapping may have rules: [])")
    rules = []
    for i, raw in enumerate(rules_in):
        where = f"{source}: rules[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: a rule must be a mapping, got {raw!r}")
        r = {**defaults, **raw}
        unknown = set(r) - set(_SCHEME_FIELDS) - set(_RULE_FIELDS)
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {sorted(unknown)}; allowed fields are "
                f"{sorted(_RULE_FIELDS + _SCHEME_FIELDS)}"
            )
        if "pattern" not in r:
            raise ValueError(f"{where}: missing field 'pattern' (a regex fully matching leaf paths, e.g. '.*kernel')")
        try:
            scheme = None if r.get("skip") else Scheme(**{k: r[k] for k in _SCHEME_FIELDS if k in r})
            rules.append(
                Rule(
                    pattern=r["pattern"],
                    scheme=scheme,
                    method=r.get("method", "rtn"),
                    force=bool(r.get("force", False)),
                    options=_frozen_options(r.get("options") or {}),
                    transforms=_parse_transforms(r.get("transforms") or []),
                )
            )
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
    ignore = d.get("ignore", DEFAULT_IGNORE)
    if not isinstance(ignore, (list, tuple)):
        raise ValueError(f"{source}: 'ignore' must be a list of regexes, got {ignore!r}")
    return QuantConfig(
        rules=tuple(rules),
        ignore=tuple(ignore),
        name=str(d.get("name", os.path.splitext(os.path.basename(source))[0])),
        description=str(d.get("description", "")),
        kv_cache=kv_cache,
        rotation=_parse_rotation(d.get("rotation"), source),
        lowrank=None if d.get("lowrank") is None else _parse_section(
            d["lowrank"], LowRankConfig, "lowrank", [f.name for f in dataclasses.fields(LowRankConfig)], source,
            "a mapping like {rank: 16}", required={"rank": "the rank of the compensation, e.g. 16"}),
        smooth_attention=None if d.get("smooth_attention") is None else _parse_section(
            d["smooth_attention"], SmoothAttentionConfig, "smooth_attention", ["alpha"], source, "{alpha: 0.5}"),
    )


def _parse_section(raw, cls, name: str, allowed: list[str], source: str, expected: str,
                   required: dict[str, str] | None = None):
    """A model-level recipe section (a mapping of `allowed` fields, `required` ones named with a hint) →
    `cls(**raw)`; errors name the source, the section and the field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: '{name}' must be {expected}, got {raw!r}")
    unknown = set(raw) - set(allowed)
    if unknown:
        raise ValueError(f"{source}: {name}: unknown field(s) {sorted(unknown)}; allowed fields are {allowed}")
    for field, hint in (required or {}).items():
        if field not in raw:
            raise ValueError(f"{source}: {name}: missing field '{field}' ({hint})")
    try:
        return cls(**raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


def _parse_rotation(raw, source: str) -> RotationConfig | None:
    """The `rotation:` mapping (or `true` for the defaults) → RotationConfig."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return RotationConfig()
    return _parse_section(raw, RotationConfig, "rotation", [f.name for f in dataclasses.fields(RotationConfig)],
                          source, "true or a mapping like {residual: true, seed: 0}")


def _parse_kv_cache(raw, source: str) -> KVCacheConfig:
    """The `kv_cache:` mapping → KVCacheConfig (`format` required)."""
    return _parse_section(raw, KVCacheConfig, "kv_cache", [f.name for f in dataclasses.fields(KVCacheConfig)],
                          source, "a mapping like {format: int8}", required={"format": "int8 or int4"})


def _frozen_options(opts: dict) -> tuple[tuple[str, Any], ...]:
    """A rule's options as sorted (name, value) pairs, nested mappings (gptq's `hqq: {iters: 10}`) too: hashable."""
    if not isinstance(opts, dict):
        raise ValueError(f"options must be a mapping of name: value, got {opts!r}")
    return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in opts.items()))


def _is_frozen_mapping(v) -> bool:
    return isinstance(v, tuple) and len(v) > 0 and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                                      for p in v)


def _parse_transforms(items) -> tuple:
    """`[awq, {smoothquant: {alpha: 0.6}}]` → (("awq", ()), ("smoothquant", (("alpha", 0.6),)))."""
    if not isinstance(items, list):
        raise ValueError(f"'transforms' must be a list like [awq] or [{{smoothquant: {{alpha: 0.5}}}}], got {items!r}")
    out = []
    for t in items:
        if isinstance(t, str):
            out.append((t, ()))
        elif isinstance(t, dict) and len(t) == 1:
            (name, opts), = t.items()
            if opts is not None and not isinstance(opts, dict):
                raise ValueError(f"transform {name!r} options must be a mapping, got {opts!r}")
            out.append((name, tuple(sorted((opts or {}).items()))))
        else:
            raise ValueError(f"a transform is a name or a one-key mapping of options, got {t!r}")
    return tuple(out)


def shipped_recipes() -> dict[str, Path]:
    """The recipes jq ships (package data `jq/recipes/*.yaml`, `configs/` in a source checkout): name -> path."""
    root = Path(__file__).resolve().parents[1] / "recipes"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def find_recipe(path: str | os.PathLike) -> Path:
    """The recipe file `path` names: a file, else a shipped recipe by name (`rtn_w4_g128`, `rtn_w4_g128.yaml`,
    `configs/rtn_w4_g128.yaml`), from any directory or wheel; FileNotFoundError names where it looked and the names."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    shipped = shipped_recipes()
    if len(p.parts) == 1 or p.parent.name in ("configs", "recipes"):
        name = p.name.removesuffix(".yaml").removesuffix(".yml")
        if name in shipped:
            return shipped[name]
    raise FileNotFoundError(f"recipe {os.fspath(path)!r}: no such file ({p.absolute()}), and jq ships no recipe of "
                            f"that name; pass a YAML path or a shipped name ({', '.join(shipped)})")


def load_recipe(path: str | os.PathLike) -> QuantConfig:
    """Load a YAML recipe file, or a shipped recipe by name (`find_recipe`); see the module docstring for the form."""
    p = find_recipe(path)
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    return recipe_from_dict(d, source=str(p))


def recipe_to_dict(cfg: QuantConfig) -> dict[str, Any]:
    """The YAML-shaped dict of a config, the inverse of `recipe_from_dict`: `recipe_from_dict(recipe_to_dict(c))
    == c`. Scheme fields at their defaults are left out, so the dict reads like a recipe file; checkpoints store
    it as the recipe that produced them."""
    default = Scheme()
    rules = []
    for r in cfg.rules:
        d: dict[str, Any] = {"pattern": r.pattern}
        if r.scheme is None:
            d["skip"] = True
        else:
            for f in dataclasses.fields(Scheme):
                v = getattr(r.scheme, f.name)
                if v != getattr(default, f.name) and not (f.name == "granularity" and r.scheme.group_size):
                    d[f.name] = list(v) if isinstance(v, tuple) else v
        if r.method != "rtn":
            d["method"] = r.method
        if r.force:
            d["force"] = True
        if r.options:
            d["options"] = {k: dict(v) if _is_frozen_mapping(v) else v for k, v in r.options}
        if r.transforms:
            d["transforms"] = [name if not opts else {name: dict(opts)} for name, opts in r.transforms]
        rules.append(d)
    out: dict[str, Any] = {"name": cfg.name, "description": cfg.description, "rules": rules, "ignore": list(cfg.ignore)}
    for f in dataclasses.fields(cfg):  # model-level sections (kv_cache, rotation, ...): their YAML-expressible fields
        v = getattr(cfg, f.name)
        if f.name in out or v is None:
            continue
        if dataclasses.is_dataclass(v):
            v = {g.name: list(x) if isinstance(x, tuple) else x for g in dataclasses.fields(v)
                 if not callable(x := getattr(v, g.name)) and x is not None}
        out[f.name] = v
    return out
