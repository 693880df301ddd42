"""TritPlaneConfig and the format constants: what config.json records and what it refuses."""

import pytest

import ptqtp
from ptqtp import format as fmt
from ptqtp.config import TritPlaneConfig
from ptqtp.errors import BadOptionError, FormatVersionError


def test_to_dict_has_the_issue_fields_and_round_trips():
    cfg = TritPlaneConfig(group_size=64, method="paper", skip=("mlp\\.down",))
    d = cfg.to_dict()
    for key in ("quant_method", "format_version", "group_size", "packing", "scale_dtype",
                "modules_to_not_convert", "method", "ptqtp_version"):
        assert key in d
    assert d["quant_method"] == "ptqtp" and d["packing"] == "base3-5" and d["scale_dtype"] == "float16"
    assert d["ptqtp_version"] == ptqtp.__version__
    assert TritPlaneConfig.from_dict(d) == cfg


def test_newer_format_version_is_refused():
    d = TritPlaneConfig().to_dict()
    d["format_version"] = fmt.FORMAT_VERSION + 1
    with pytest.raises(FormatVersionError, match="upgrade ptqtp"):
        TritPlaneConfig.from_dict(d)


@pytest.mark.parametrize("kw", [dict(group_size=0), dict(method="gptq"), dict(max_iters=0), dict(tol=-1.0),
                                dict(device="tpu"), dict(skip=("(",))])
def test_bad_options_raise_one_line_errors(kw):
    with pytest.raises(BadOptionError) as e:
        TritPlaneConfig(**kw)
    assert "\n" not in str(e.value)


def test_lm_head_is_skipped_by_default_and_skip_patterns_apply():
    cfg = TritPlaneConfig(skip=(r"layers\.1\.mlp",))
    assert cfg.is_skipped("lm_head")
    assert cfg.is_skipped("model.layers.1.mlp.up_proj")
    assert not cfg.is_skipped("model.layers.0.mlp.up_proj")


def test_bits_per_weight_at_group_128_is_3_45():
    assert fmt.bits_per_weight(4096, 4096, 128) == pytest.approx(3.45, abs=5e-3)
    # a partial last group and a padded last byte cost a little more, never less
    assert fmt.bits_per_weight(576, 576, 128) > 3.45
