"""Bad input to `ptqtp quantize`, as a user meets it: a damaged source, an output that cannot be written (read-only,
full, limited), Ctrl-C. Each gets one line naming the cause and the fix, exit code 2 (130 for Ctrl-C), no
traceback and no half-written output. docs/bad_input.md is the table of every case and its test; the last test
here checks that every test it names exists."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from ptqtp import checkpoint as ckpt
from ptqtp.cli import main
from ptqtp.lock import LOCK_NAME

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RTN = ["--method", "rtn-ternary"]  # the cheapest solve: these tests are about files


def _one_line(capsys, argv) -> str:
    """Run `ptqtp quantize ARGV`; the one `error:` line it printed (and nothing like a traceback)."""
    code = main(["quantize", *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _sharded(tiny: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The tiny model split into two shards with an index, as save_pretrained writes large models."""
    shutil.copytree(tiny, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, part in parts.items():
        ckpt.write_shard(dst / f, {n: tensors[n] for n in part}, {"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}))
    return dst


def _raw_shard(path: pathlib.Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


SECOND = "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("damage, expect", [
    ("truncated shard", rf"{SECOND} is not a valid safetensors file \(expected \d+ bytes, found \d+\)"),
    ("corrupt header", rf"{SECOND} is not a valid safetensors file \(unreadable header"),
    ("shard missing from the index", rf"index.json lists {SECOND}, which is missing from .*incomplete"),
    ("index not JSON", r"model.safetensors.index.json is not a valid index"),
    ("tensor in two shards", rf"tensor \S+ appears in both model-00001-of-00002.safetensors and {SECOND}"),
    ("unknown dtype", r"extra.safetensors: tensor x has dtype F8_E8M0, which this ptqtp .* cannot read; convert"),
    ("config.json not JSON", r"config.json is not valid JSON"),
    ("no safetensors", r"holds no \*.safetensors weights"),
])
def test_a_damaged_source_is_one_line_naming_the_file_and_writes_nothing(damage, expect, tiny_model_dir, tmp_path,
                                                                         capsys):
    src = _sharded(tiny_model_dir("llama"), tmp_path / "src")
    second = src / SECOND
    if damage == "truncated shard":
        second.write_bytes(second.read_bytes()[:-100])
    elif damage == "corrupt header":
        raw = second.read_bytes()
        second.write_bytes(raw[:8] + b"#" * 16 + raw[24:])
    elif damage == "shard missing from the index":
        second.unlink()
    elif damage == "index not JSON":
        (src / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    elif damage == "tensor in two shards":
        first = load_file(src / "model-00001-of-00002.safetensors")
        name = sorted(first)[0]
        ckpt.write_shard(second, {**load_file(second), name: first[name]}, {"format": "pt"})
    elif damage == "unknown dtype":
        (src / "model.safetensors.index.json").unlink()
        _raw_shard(src / "extra.safetensors", {"x": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]}},
                   b"\x00\x00")
    elif damage == "config.json not JSON":
        (src / "config.json").write_text("{\"model_type\": ")
    elif damage == "no safetensors":
        for p in src.glob("*.safetensors*"):
            p.unlink()
    out = tmp_path / "q"
    assert re.search(expect, _one_line(capsys, [src, "-o", out, *RTN]))
    assert not out.exists()


def test_model_that_is_a_file_or_no_hub_id(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "is a file, not a model folder" in _one_line(capsys, [tmp_path / "weights.bin", "-o", tmp_path / "q"])
    assert "is neither an existing folder nor a valid hub id" in _one_line(capsys, ["no such model!", "-o",
                                                                                   tmp_path / "q"])


@pytest.mark.parametrize("error, expect", [
    ("GatedRepoError", "is gated; accept its licence on huggingface.co and log in"),
    ("RepositoryNotFoundError", "no model owner/model on the hub (or it is private)"),
    ("RevisionNotFoundError", "owner/model has no revision"),
    ("HfHubHTTPError", "the hub refused owner/model (boom)"),
    ("LocalEntryNotFoundError", "is not in the local Hugging Face cache and the hub cannot be reached"),
    ("ConnectionError", "cannot reach the Hugging Face hub for owner/model (ConnectionError)"),
])
def test_hub_refusals_are_one_line(error, expect, tmp_path, capsys, monkeypatch):
    """What the hub answers (stood in for: tests never reach it) becomes one line with the fix."""
    import types

    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    def refuse(*args, **kwargs):
        if error == "ConnectionError":
            raise ConnectionError("no route to host")
        if error == "LocalEntryNotFoundError":
            raise hf_errors.LocalEntryNotFoundError("boom")
        raise getattr(hf_errors, error)("boom", response=types.SimpleNamespace(headers={}, status_code=404,
                                                                               request=None))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert expect in _one_line(capsys, ["owner/model", "-o", tmp_path / "q"])


def test_sources_with_nothing_to_quantize(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    assert "no Linear weights inside decoder layers" in _one_line(capsys, [src, "-o", tmp_path / "q", "--skip", "."])
    assert main(["quantize", str(src), "-o", str(tmp_path / "int3"), "--method", "rtn-int3", "--quiet"]) == 0
    assert "is a ptqtp baseline (fake-quantized weights)" in _one_line(capsys, [tmp_path / "int3", "-o",
                                                                              tmp_path / "q"])


def test_a_source_tensor_named_like_ptqtp_scales_is_refused_up_front(tiny_model_dir, tmp_path, capsys):
    """A dense `X.weight_scale` beside a Linear `X.weight` would collide with the scales ptqtp writes for X."""
    src = shutil.copytree(tiny_model_dir("llama"), tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(288)
    ckpt.write_shard(src / "model.safetensors", tensors, {"format": "pt"})
    msg = _one_line(capsys, [src, "-o", tmp_path / "q", *RTN])
    assert "stores model.layers.0.mlp.up_proj.weight_scale, the name ptqtp gives the scales of " \
           "model.layers.0.mlp.up_proj.weight" in msg
    assert r"--skip 'model\.layers\.0\.mlp\.up_proj$'" in msg
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------------------ the output


def test_output_that_is_a_file_or_the_source_or_below_a_file(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    (tmp_path / "file").write_text("x")
    assert "exists and is a file" in _one_line(capsys, [src, "-o", tmp_path / "file", *RTN])
    assert "is the source folder" in _one_line(capsys, [src, "-o", src, *RTN])
    assert "part of that path is a file, not a folder" in _one_line(capsys, [src, "-o", tmp_path / "file" / "q", *RTN])
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("fails", ["mkdir", "lock", "shard"])
def test_read_only_output_is_one_line(fails, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The filesystem refuses a write (EROFS) where ptqtp first writes: the folder, its lock, or a shard."""
    out = tmp_path / "q"

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    if fails == "mkdir":
        monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    elif fails == "lock":
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda p, *a, **k: refuse() if str(p).endswith(LOCK_NAME) else
                            real_open(p, *a, **k))
    else:
        monkeypatch.setattr(ckpt.ShardWriter, "_put", refuse)
    msg = _one_line(capsys, [tiny_model_dir("llama"), "-o", out, *RTN])
    assert "Read-only file system" in msg and "choose another -o directory" in msg


def _namespace_fs() -> str | None:
    """Why a private tmpfs cannot be mounted here (None when it can): the real-filesystem tests mount one as root
    of a user namespace (`unshare -rm`), which needs no privileges where user namespaces are enabled."""
    if not shutil.which("unshare"):
        return "no unshare(1) on this machine"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"user namespaces cannot mount here ({probe.stderr.strip()})"


_CHECK = """
import json, pathlib, sys
from ptqtp import checkpoint as ckpt
out = pathlib.Path(sys.argv[1])
files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
complete = []
for name in files:
    if name.endswith(".safetensors"):
        ckpt.read_header(out / name)  # raises if a file under its final name is incomplete
        complete.append(name)
print("FILES " + json.dumps({"files": files, "complete": complete}))
"""


def _in_tmpfs(tmp_path: pathlib.Path, size: str, quantize_args: list[str], before: str = "", after: str = ""):
    """`ptqtp quantize ... -o MNT/q` on a private tmpfs of `size` mounted at MNT; returns (exit code, stderr
    lines, what MNT/q held afterwards). `before`/`after`: shell run around it (e.g. a remount read-only)."""
    reason = _namespace_fs()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "check.py").write_text(_CHECK)
    py = sys.executable
    script = textwrap.dedent(f"""
        mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99
        {before}
        {py} -m ptqtp quantize {' '.join(quantize_args)} -o {mnt}/q 2>{tmp_path}/err
        echo "RC $?"
        {after}
        {py} {tmp_path}/check.py {mnt}/q
    """)
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rc = int(re.search(r"^RC (\d+)$", res.stdout, re.M).group(1))
    held = json.loads(re.search(r"^FILES (.*)$", res.stdout, re.M).group(1))
    return rc, (tmp_path / "err").read_text().strip().splitlines(), held


def test_a_really_full_disk_is_one_line_and_leaves_only_complete_files(tiny_model_dir, tmp_path):
    """A 500 KB filesystem (the output needs about 860 KB): ENOSPC from the kernel, not a stand-in."""
    rc, err, held = _in_tmpfs(tmp_path, "500k", [str(tiny_model_dir("llama")), *RTN, "--max-shard-size", "60KB",
                                                 "--quiet"])
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: no space left on the device while writing") and "--resume" in err[0]
    assert held["complete"] and not any(ckpt.TMP_MARK in f or f == LOCK_NAME for f in held["files"]), held
    assert "config.json" not in held["files"]


def test_a_really_read_only_output_is_one_line_and_keeps_its_files(tiny_model_dir, tmp_path):
    """A finished run on a filesystem remounted read-only, replaced with --overwrite: EROFS from the kernel."""
    src = str(tiny_model_dir("llama"))
    first = f"{sys.executable} -m ptqtp quantize {src} {' '.join(RTN)} --quiet -o {tmp_path}/mnt/q"
    rc, err, held = _in_tmpfs(tmp_path, "4m", [src, *RTN, "--overwrite"],
                              before=f"{first} && mount -o remount,ro {tmp_path}/mnt")
    assert rc == 2 and len(err) == 1, err
    assert "Read-only file system" in err[0] and "choose another -o directory" in err[0]
    assert {"config.json", "model.safetensors", "ptqtp_report.json"} <= set(held["files"]) and held["complete"]


def test_a_file_size_limit_is_one_line(tiny_model_dir, tmp_path):
    """`ulimit -f` below a shard's size: the kernel answers EFBIG (Python ignores SIGXFSZ)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "q"
    res = subprocess.run([sys.executable, "-m", "ptqtp", "quantize", str(tiny_model_dir("llama")), "-o", str(out),
                          *RTN, "--quiet"], env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "file-size limit (ulimit -f)" in res.stderr
    assert not any(ckpt.TMP_MARK in p.name for p in out.iterdir())


# ---------------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_leaves_only_complete_files_and_resume_finishes(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("llama")
    opts = [*RTN, "--max-shard-size", "60KB", "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["quantize", str(src), "-o", str(ref), *opts]) == 0
    slow = [sys.executable, str(pathlib.Path(__file__).with_name("slow_quantize.py")), "0.1", "quantize"]
    proc = subprocess.Popen([*slow, str(src), "-o", str(out), *opts], env={**ENV, "SLOW_QUANTIZE_HOLD": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "ptqtp_manifest.json").read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and err.strip() == "interrupted; rerun with --resume to continue where it stopped"
    names = sorted(p.name for p in out.iterdir())
    assert not any(ckpt.TMP_MARK in n or n == LOCK_NAME for n in names), names
    assert "config.json" not in names and "ptqtp_manifest.json" in names
    for p in out.glob("*.safetensors"):
        ckpt.read_header(p)  # complete, or not there
    assert main(["quantize", str(src), "-o", str(out), *opts, "--resume"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "ptqtp_report.json"} == \
        {p.name: p.read_bytes() for p in ref.iterdir() if p.name != "ptqtp_report.json"}


# ------------------------------------------------------------------------------------------------- the table


def test_every_test_the_bad_input_table_names_exists():
    text = (ROOT / "docs" / "bad_input.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(\w+)`", text)
    assert len(named) >= 30
    missing = []
    for path, name in named:
        source = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
        if not re.search(rf"^def {name}\(", source, re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/bad_input.md names tests that do not exist: {missing}"
