"""The quantize facade: `quantize_checkpoint` picks the mode and keeps its former keyword names; the in-memory
`quantize_model` is reachable from its public home and its former module."""

from __future__ import annotations

import json

import pytest

import ptqtp
from ptqtp.errors import BadOptionError

RTN = ptqtp.TritPlaneConfig(method="rtn-ternary")  # the cheapest solve: these tests are about the plumbing


def test_former_keyword_names_give_the_same_checkpoint(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    ptqtp.quantize_checkpoint(src, tmp_path / "new", RTN, show_progress=False)
    ptqtp.quantize_checkpoint(model=src, out=tmp_path / "old", config=RTN, show_progress=False)
    old, new = (tmp_path / d / "model.safetensors" for d in ("old", "new"))
    assert old.read_bytes() == new.read_bytes()
    with pytest.raises(BadOptionError, match="src= only"):
        ptqtp.quantize_checkpoint(src, tmp_path / "x", RTN, model=src)
    with pytest.raises(BadOptionError, match="needs dst"):
        ptqtp.quantize_checkpoint(src)


def test_calib_picks_the_calibrated_driver(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    free = ptqtp.quantize_checkpoint(src, tmp_path / "free", RTN, show_progress=False)
    cal = ptqtp.quantize_checkpoint(src, tmp_path / "cal", RTN, calib="boolq", calib_samples=1, calib_seq_len=16,
                                    show_progress=False)
    assert "calibration" not in free and cal["calibration"]["samples"] == 1
    assert json.loads((tmp_path / "cal" / "ptqtp_report.json").read_text())["calibration"]["seq_len"] == 16
    with pytest.raises(BadOptionError, match="--calib-damp must be a number > 0"):
        ptqtp.quantize_checkpoint(src, tmp_path / "bad", RTN, calib="boolq", calib_damp=0.0)


def test_quantize_model_keeps_its_former_home():
    from ptqtp import quantize, replace
    from ptqtp.replace import quantize_model

    assert quantize_model is replace.quantize_model is quantize.quantize_model is ptqtp.quantize_model
    with pytest.raises(AttributeError):
        replace.no_such_name
