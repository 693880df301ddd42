"""The command line as a user meets it: `--help` of every subcommand, `--version`, `ptqtp info`, and the README
commands agreeing with the parser."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import ptqtp
from ptqtp import format as fmt
from ptqtp.cli import build_parser, main

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The flags each issue promises; `--help` must list all of them.
DOCUMENTED_FLAGS = {
    "quantize": ["-o", "--group-size", "--method", "--device", "--skip", "--resume", "--overwrite",
                 "--max-shard-size", "--max-iters", "--tol", "--calib", "--calib-samples", "--calib-seq-len",
                 "--calib-feedback", "--calib-damp"],
    "eval": ["--ppl", "--seq-len", "--max-windows", "--tasks", "--limit", "--batch-size", "--device", "--output"],
    "generate": ["--max-new-tokens", "--device", "--dtype", "--threads"],
    "info": [],
}


@pytest.fixture(autouse=True)
def _user_environment(monkeypatch):
    """As a user runs it: one-line errors (no PTQTP_DEBUG) and the backend ptqtp picks itself."""
    for var in ("PTQTP_DEBUG", "PTQTP_BACKEND", "PTQTP_DISABLED_BACKENDS"):
        monkeypatch.delenv(var, raising=False)


def run_cli(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`ptqtp ARGV` through the CLI's own `main` (the console script's body), capturing both streams."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["ptqtp", *argv], rc, out, err)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys):
    out = _help(capsys)
    for sub in DOCUMENTED_FLAGS:
        assert re.search(rf"^\s+{sub}\s+\S", out, re.M), f"`ptqtp --help` does not describe {sub}"
    assert "--version" in out


@pytest.mark.parametrize("sub", sorted(DOCUMENTED_FLAGS))
def test_subcommand_help_lists_documented_flags(capsys, sub):
    out = _help(capsys, sub)
    assert out.startswith(f"usage: ptqtp {sub}")
    missing = [f for f in DOCUMENTED_FLAGS[sub] if not re.search(rf"(^|[\s,\[]){re.escape(f)}\b", out)]
    assert not missing, f"`ptqtp {sub} --help` does not list {missing}"


def test_version_matches_the_package(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ptqtp {ptqtp.__version__}"


def test_console_script_runs():
    """The installed `ptqtp` entry point works as its own process."""
    exe = pathlib.Path(sys.executable).with_name("ptqtp")
    assert exe.exists(), f"no console script at {exe}; reinstall with pip install -e ."
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"ptqtp {ptqtp.__version__}", out.stderr


def _readme_commands() -> list[list[str]]:
    """Every `ptqtp <subcommand> ...` line inside the README's code blocks, as argv lists."""
    cmds, fence = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in ("bash", "sh", "") and line.startswith("ptqtp "):
            cmds.append(shlex.split(line, comments=True)[1:])
    return cmds


def test_readme_commands_parse_with_the_real_parser():
    """README and `--help` cannot drift: each documented command line is accepted as written."""
    cmds = _readme_commands()
    assert {c[0] for c in cmds} >= {"quantize", "eval", "info"}, "README must show quantize, eval and info"
    parser = build_parser()
    for argv in cmds:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: ptqtp {' '.join(argv)}")


# ------------------------------------------------------------------------------------------------ info

def _hand_packed_dir(dense: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A ptqtp directory built directly from the format contract: every decoder Linear packed, random trits."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, w in load_file(dense / "model.safetensors").items():
        if ".layers." in name and name.endswith(".weight") and w.dim() == 2:
            o, i = w.shape
            planes = torch.randint(-1, 2, (2, o, i), generator=gen, dtype=torch.int8)  # (2, out, in)
            tensors[name] = ptqtp.pack(planes)  # (2, out, ceil(in / 5))
            tensors[name[: -len(".weight")] + "." + fmt.SCALE_SUFFIX] = torch.rand(
                fmt.scale_shape(o, i, 128), generator=gen).half()  # (2, out, G)
        else:
            tensors[name] = w
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = ptqtp.TritPlaneConfig().to_dict()
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_info_counts_bits_per_weight_from_the_files(tiny_model_dir, tmp_path):
    """Bits per weight equals the format's formula for the real shapes (partial groups, padded bytes)."""
    from ptqtp.info import describe

    dense = tiny_model_dir("llama")
    s = describe(str(_hand_packed_dir(dense, tmp_path / "q")))
    shapes = [(w.shape[0], w.shape[1]) for n, w in load_file(dense / "model.safetensors").items()
              if ".layers." in n and n.endswith(".weight") and w.dim() == 2]
    stored_bits = sum(fmt.bits_per_weight(o, i, 128) * o * i for o, i in shapes)
    assert len(s.quantized) == len(shapes) == 14
    assert all(t.exact_in for t in s.quantized)
    assert s.quantized_weights == sum(o * i for o, i in shapes)
    assert s.bits_per_weight == pytest.approx(stored_bits / s.quantized_weights, rel=1e-12)
    assert s.dense_tensors == 7  # embed, lm_head, final norm, 2 norms x 2 layers


def _quantized_tiny(tiny_model_dir, tmp_path) -> pathlib.Path:
    from ptqtp import quantize_checkpoint

    out = tmp_path / "tiny-ptqtp"
    quantize_checkpoint(str(tiny_model_dir("llama")), str(out), ptqtp.TritPlaneConfig(max_iters=5),
                        show_progress=False)
    return out


def test_info_on_a_quantized_model(capsys, tiny_model_dir, tmp_path):
    out_dir = _quantized_tiny(tiny_model_dir, tmp_path)
    res = run_cli(capsys, "info", str(out_dir))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert re.search(r"^format\s+ptqtp v1, packing base3-5", text, re.M)
    assert re.search(r"^group size\s+128$", text, re.M)
    bits = float(re.search(r"^bits per weight\s+([\d.]+)", text, re.M).group(1))
    assert 3.45 <= bits < 3.7  # tiny widths (160, 288) have partial groups, so slightly above 3.45
    assert re.search(r"^tensors\s+14 quantized Linears", text, re.M)
    ratio = float(re.search(r"^size on disk .*\(dense original .*, ([\d.]+)x smaller\)$", text, re.M).group(1))
    totals = json.loads((out_dir / "ptqtp_report.json").read_text())["totals"]
    assert ratio == pytest.approx(totals["size_before_bytes"] / totals["size_after_bytes"], abs=0.006)
    assert bits == pytest.approx(totals["bits_per_weight"], abs=5e-4)  # files and report agree
    assert re.search(r"^relative error\s+mean 0\.\d+, max 0\.\d+ over 14 tensors", text, re.M)
    assert len(re.findall(r"^  0\.\d{4}  model\.layers\.", text, re.M)) == 5  # worst 5 tensors
    for label in ("decode", "prefill"):
        assert re.search(rf"^backend {label}\s+M=\d+\s+\w+", text, re.M), f"no {label} backend line"


def test_info_without_dir_lists_backends_with_reasons(capsys):
    res = run_cli(capsys, "info")
    assert res.returncode == 0, res.stderr
    rows = res.stdout.splitlines()[1:]
    assert any(re.match(r"\s+reference\s+yes\s+\S", r) for r in rows), res.stdout
    assert all(re.match(r"\s+\S+\s+(yes|no)\s+\S", r) for r in rows), res.stdout  # every row has a reason


@pytest.mark.parametrize("case", ["missing", "dense", "empty", "corrupt"])
def test_info_on_a_non_ptqtp_dir_is_one_line(capsys, tiny_model_dir, tmp_path, case):
    if case == "missing":
        target, expect = tmp_path / "nope", "no such directory"
    elif case == "dense":
        target, expect = tiny_model_dir("llama"), "not a ptqtp checkpoint"
    elif case == "empty":
        target, expect = tmp_path, "no config.json"
    else:
        target = _hand_packed_dir(tiny_model_dir("llama"), tmp_path / "q")
        (target / "model.safetensors").write_bytes(b"\xff" * 16)
        expect = "model.safetensors is not a valid safetensors file"
    res = run_cli(capsys, "info", str(target))
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.stderr
