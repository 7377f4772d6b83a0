"""Scheme validation, layouts, recipes (`Rule`, `QuantConfig`, `recipe_from_dict`, `load_recipe`): every error
names what is wrong and what is allowed."""

from __future__ import annotations

import re

import pytest

import jq
from jq import QuantConfig, Rule, Scheme, load_recipe, recipe_from_dict
from jq.tree.recipe import DEFAULT_IGNORE

# ----------------------------------------------------------------------------------------------- Scheme errors


def test_unknown_format():
    with pytest.raises(ValueError, match=r"scheme field 'format' has value 'int9'; allowed values are \[.*'int4'.*'nf4'"):
        Scheme("int9")


def test_group_size_not_dividing_names_path_value_and_pad():
    s = Scheme("int4", group_size=32)
    with pytest.raises(
        ValueError,
        match=r"^layers_0/mlp/kernel: group_size 32 does not divide axis 0 of length 100 \(shape \(100, 8\)\).*pad: true",
    ):
        s.layout((100, 8), (0,), path="layers_0/mlp/kernel")


def test_group_size_pad_layout():
    lay = Scheme("int4", group_size=32, pad=True).layout((100, 8), (0,))
    assert lay.padded == 128 and lay.stored_shape == (128, 8) and lay.scale_shape == (4, 8)
    assert lay.grouped_shape == (4, 32, 8)
    lay = Scheme("int4", group_size=25).layout((100, 8), (0,))  # divides: no padding
    assert lay.padded is None and lay.scale_shape == (4, 8)


def test_layout_axes_normalised_and_group_axis():
    lay = Scheme("int8", group_size=4).layout((2, 8, 3), (-2, 0))
    assert lay.axes == (0, 1) and lay.group_axis == 1
    assert lay.grouped_shape == (2, 2, 4, 3) and lay.scale_shape == (2, 2, 3) and lay.reduce_axes == (2,)
    lay = Scheme("int8").layout((2, 8, 3), (0, 1))
    assert lay.scale_shape == (1, 1, 3) and lay.reduce_axes == (0, 1)
    lay = Scheme("int8", granularity="tensor").layout((2, 8, 3), (0, 1))
    assert lay.scale_shape == (1, 1, 1)


def test_asymmetric_float_format():
    for fmt in ("nf4", "fp8_e4m3", "fp4_e2m1"):
        with pytest.raises(ValueError, match=rf"'symmetric' is False but format '{fmt}' has no zero point"):
            Scheme(fmt, symmetric=False)


def test_bad_range_method():
    with pytest.raises(
        ValueError,
        match=r"scheme field 'range' has value 'max'; allowed values are \['minmax', 'absmax', 'percentile', 'mse', 'absmean', 'gaussian'\]",
    ):
        Scheme("int4", range="max")


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(granularity="row"), r"scheme field 'granularity' has value 'row'; allowed values are \['tensor', 'channel', 'group'\]"),
        (dict(granularity="group"), r"scheme field 'group_size' is missing"),
        (dict(group_size=0), r"scheme field 'group_size' has value 0; use a positive int"),
        (dict(group_size=12.5), r"scheme field 'group_size' has value 12\.5; use a positive int"),
        (dict(scale_dtype="float64"), r"scheme field 'scale_dtype' has value 'float64'; allowed values are \['float32', 'float16', 'bfloat16'\]"),
        (dict(zero_point="half"), r"scheme field 'zero_point' has value 'half'"),
        (dict(percentile=40.0), r"scheme field 'percentile' has value 40\.0; use a value in \(50, 100\]"),
        (dict(mse_max_shrink=1.0), r"mse_max_shrink=1\.0.*need grid >= 1, 0 <= max_shrink < 1, norm > 0"),
        (dict(mse_grid=0), r"mse_grid=0"),
        (dict(mse_norm=0), r"mse_norm=0"),
    ],
)
def test_scheme_field_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Scheme("int4", **kw)


def test_group_size_implies_group_granularity_and_describe():
    s = Scheme("int4", symmetric=False, group_size=128)
    assert s.granularity == "group" and s.bits == 4
    assert s.describe() == "int4 asym g128"
    assert Scheme("nf4", range="mse").describe() == "nf4 sym channel mse"
    assert Scheme("int8", axes=[1]).axes == (1,)
    assert hash(s) == hash(Scheme("int4", symmetric=False, group_size=128))  # static-argument friendly


# ------------------------------------------------------------------------------------------------------ recipes


def test_invalid_regex():
    with pytest.raises(ValueError, match=r"rule pattern '\(\.\*kernel' is not a valid regular expression"):
        Rule("(.*kernel", Scheme())
    with pytest.raises(ValueError, match=r"ignore pattern '\[bias' is not a valid regular expression"):
        QuantConfig(rules=(Rule(".*", Scheme()),), ignore=("[bias",))
    with pytest.raises(ValueError, match=r"^<dict>: rules\[1\]: rule pattern '\*kernel' is not a valid regular"):
        recipe_from_dict({"rules": [{"pattern": ".*"}, {"pattern": "*kernel"}]})


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'gptq9'; choose one of \[.*'rtn'.*\]"):
        Rule(".*", Scheme(), method="gptq9")
    with pytest.raises(ValueError, match=r"^r\.yaml: rules\[0\]: unknown method 'gptq9'; choose one of"):
        recipe_from_dict({"rules": [{"pattern": ".*", "method": "gptq9"}]}, source="r.yaml")
    with pytest.raises(ValueError, match=r"unknown method 'nope'; choose one of \[.*'rtn'"):
        jq.algorithms.get_method("nope")


def test_unknown_rule_field_names_field_and_lists_allowed():
    with pytest.raises(ValueError) as e:
        recipe_from_dict({"rules": [{"pattern": ".*", "formt": "int4", "group": 128}]}, source="x.yaml")
    msg = str(e.value)
    assert msg.startswith("x.yaml: rules[0]: unknown field(s) ['formt', 'group']; allowed fields are [")
    allowed = re.search(r"allowed fields are \[(.*)\]", msg).group(1)
    for f in ("pattern", "method", "skip", "force", "options", "format", "symmetric", "group_size", "pad", "range",
              "scale_dtype", "zero_point", "axes"):
        assert f"'{f}'" in allowed


def test_unknown_top_level_field():
    with pytest.raises(
        ValueError,
        match=r"<dict>: unknown top-level field\(s\) \['rule'\]; allowed fields are \['defaults', 'description', 'ignore', 'kv_cache', 'lowrank', 'name', 'rotation', 'rules', 'smooth_attention'\]",
    ):
        recipe_from_dict({"rule": []})


@pytest.mark.parametrize(
    "d,msg",
    [
        ([1, 2], r"<dict>: a recipe must be a mapping with 'rules', got list"),
        ({"rules": []}, r"<dict>: 'rules' must be a non-empty list of rules, got \[\]"),
        ({"rules": {"pattern": ".*"}}, r"'rules' must be a non-empty list"),
        ({"rules": ["x"]}, r"<dict>: rules\[0\]: a rule must be a mapping, got 'x'"),
        ({"rules": [{"format": "int4"}]}, r"<dict>: rules\[0\]: missing field 'pattern'"),
        ({"rules": [{"pattern": ".*"}], "ignore": "bias"}, r"'ignore' must be a list of regexes, got 'bias'"),
        ({"rules": [{"pattern": "a"}, {"pattern": ".*", "format": "int4", "group_size": -1}]},
         r"^<dict>: rules\[1\]: scheme field 'group_size' has value -1"),
        ({"rules": [{"pattern": ".*", "format": "nf4", "symmetric": False}]},
         r"^<dict>: rules\[0\]: scheme field 'symmetric' is False but format 'nf4'"),
        ({"rules": [{"pattern": ".*", "range": "max"}]}, r"rules\[0\]: scheme field 'range' has value 'max'"),
        ({"rules": [{"pattern": ".*", "method": "gptq", "options": ["damp", 0.01]}]},
         r"^<dict>: rules\[0\]: options must be a mapping of name: value, got \['damp', 0.01\]"),
    ],
)
def test_recipe_from_dict_errors(d, msg):
    with pytest.raises(ValueError, match=msg):
        recipe_from_dict(d)


def test_recipe_from_dict_builds_rules_in_order():
    cfg = recipe_from_dict(
        {
            "name": "mix",
            "description": "two rules",
            "defaults": {"format": "int4", "group_size": 64, "symmetric": False},
            "rules": [
                {"pattern": ".*attn.*kernel", "format": "int8", "group_size": None, "granularity": "channel"},
                {"pattern": ".*kernel", "method": "hqq", "options": {"p": 1.0}},
                {"pattern": ".*wo.*", "skip": True, "force": True},
            ],
        }
    )
    assert cfg.name == "mix" and cfg.description == "two rules"
    assert [r.pattern for r in cfg.rules] == [".*attn.*kernel", ".*kernel", ".*wo.*"]
    r0, r1, r2 = cfg.rules
    assert r0.scheme == Scheme("int8", symmetric=False, granularity="channel")
    assert r1.scheme == Scheme("int4", symmetric=False, group_size=64) and r1.options == (("p", 1.0),)
    assert r1.record == jq.algorithms.RTN(grid=jq.algorithms.HQQFit(p=1.0))  # the options build the method record
    assert r2.scheme is None and r2.force
    with pytest.raises(ValueError, match=r"rules\[0\]: rule '.\*kernel': method 'rtn' does not take these options "
                                         r"\(\{'a': 1\}\)"):
        recipe_from_dict({"rules": [{"pattern": ".*kernel", "format": "int8", "options": {"a": 1}}]})
    with pytest.raises(ValueError, match=r"method 'awq_clip': unknown option\(s\) \['grd'\]; allowed: \['grid', "):
        recipe_from_dict({"rules": [{"pattern": ".*kernel", "format": "int8", "method": "awq_clip",
                                     "options": {"grd": 5}}]})
    assert cfg.ignore == DEFAULT_IGNORE
    assert hash(cfg)  # usable as a static jit argument


def test_load_recipe_from_yaml(tmp_path):
    p = tmp_path / "my_recipe.yaml"
    p.write_text(
        """
description: 4-bit asymmetric, groups of 32
rules:
  - pattern: ".*/kernel"
    method: rtn
    format: int4
    symmetric: false
    group_size: 32
    scale_dtype: bfloat16
  - pattern: ".*"
    format: fp8_e4m3
    granularity: tensor
ignore: [".*lm_head.*"]
"""
    )
    cfg = load_recipe(p)
    assert cfg.name == "my_recipe"  # from the file name
    assert cfg.description == "4-bit asymmetric, groups of 32"
    assert cfg.rules[0].scheme == Scheme("int4", symmetric=False, group_size=32, scale_dtype="bfloat16")
    assert cfg.rules[0].method == "rtn"
    assert cfg.rules[1].scheme == Scheme("fp8_e4m3", granularity="tensor")
    assert cfg.ignore == (".*lm_head.*",)
    assert cfg.rule_for("blk/lm_head/kernel", 2) is None
    assert cfg.rule_for("blk/mlp/kernel", 2) is cfg.rules[0]
    assert cfg.rule_for("blk/mlp/w", 2) is cfg.rules[1]
    assert cfg.rule_for("blk/mlp/w", 1) is None  # 1-D leaves are always ignored


def test_load_recipe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"recipe '.*nope\.yaml': no such file .*shipped name \(aqlm_w2"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match=r"recipe 'configs/rtn_w4_g12\.yaml': no such file"):
        load_recipe("configs/rtn_w4_g12.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n  - pattern: x\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        load_recipe(bad)
    unk = tmp_path / "unk.yaml"
    unk.write_text("rules:\n  - pattern: '.*'\n    bits: 4\n")
    with pytest.raises(ValueError, match=r"unk\.yaml: rules\[0\]: unknown field\(s\) \['bits'\]; allowed fields are"):
        load_recipe(unk)


def test_shipped_recipes_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    """The README's `--recipe configs/X.yaml` works outside the repository (and from an installed wheel): a path
    that does not exist falls back to the shipped recipe of that name; an existing file always wins."""
    from jq.tree.recipe import find_recipe, shipped_recipes

    monkeypatch.chdir(tmp_path)
    shipped = shipped_recipes()
    assert "rtn_w4_g128" in shipped and shipped["rtn_w4_g128"].parent.name == "recipes"
    for name in ("configs/rtn_w4_g128.yaml", "rtn_w4_g128.yaml", "rtn_w4_g128"):
        assert find_recipe(name) == shipped["rtn_w4_g128"]
        assert load_recipe(name).name == "rtn_w4_g128"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rtn_w4_g128.yaml").write_text("name: mine\nrules: [{pattern: x, format: int8}]\n")
    assert load_recipe("configs/rtn_w4_g128.yaml").name == "mine"
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_recipe("elsewhere/rtn_w8.yaml")  # only a bare name or configs/NAME falls back


# ----------------------------------------------------------------------------------------- ignore / rule choice


@pytest.mark.parametrize(
    "path,ignored",
    [
        ("model/embed_tokens/embedding", True),
        ("transformer/wte/embedding", True),
        ("Embed_0/embedding", True),  # linen's nn.Embed: the leaf name decides
        ("embed/embedding", True),
        ("token_embd", True),
        ("lm_head/kernel", True),
        ("model/lm_head", True),
        ("layers_0/input_layernorm/scale", True),
        ("layers_0/post_attention_norm/scale", True),
        ("Dense_0/bias", True),
        ("Dense_0/kernel", False),
        ("layers_3/attn/q_proj/kernel", False),
        ("blocks/mlp/wi/kernel", False),
    ],
)
def test_default_ignore(path, ignored):
    cfg = QuantConfig.simple(Scheme("int8"), pattern=".*")
    assert cfg.ignored(path, 2) == ignored
    assert (cfg.rule_for(path, 2) is None) == ignored
    assert cfg.ignored(path, 1) and cfg.rule_for(path, 1) is None  # 1-D leaves always stay float


def test_rule_order_first_match_wins_and_force():
    a, b, c = Scheme("int8"), Scheme("int4", group_size=32), Scheme("nf4")
    cfg = QuantConfig(
        rules=(Rule(".*q_proj/kernel", a), Rule(".*kernel", b), Rule(".*lm_head.*", c, force=True), Rule(".*", c))
    )
    assert cfg.rule_for("l0/q_proj/kernel", 2).scheme == a
    assert cfg.rule_for("l0/k_proj/kernel", 2).scheme == b
    assert cfg.rule_for("lm_head/kernel", 2).scheme == c  # ignored by default, reached by force
    assert cfg.rule_for("l0/x_q_proj/kernel", 2).scheme == a  # fullmatch, not search ...
    assert cfg.rule_for("q_proj/kernel/extra", 2).scheme == c  # ... so a longer path falls through
    assert cfg.rule_for("Dense_0/bias", 2) is None  # ignored; the catch-all rule is not forced
