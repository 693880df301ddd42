"""The output directory (`writer`): shard planning, the rules for an existing output directory, resume by source
content, and the lock that keeps two runs apart."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

import ptqtp
from ptqtp import checkpoint as ckpt
from ptqtp import loader, quantize_checkpoint
from ptqtp.errors import OutputBusyError, OutputExistsError
from ptqtp.lock import LOCK_NAME, OutputLock
from ptqtp.writer import plan_shards

CFG = ptqtp.TritPlaneConfig()


def test_shard_plan_is_bounded_and_keeps_pairs_together(tiny_model_dir):
    sources = loader.list_tensors(tiny_model_dir("llama"), CFG)
    limit = 60_000
    shards = plan_shards(sources, CFG, limit)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for s in shards:
        assert s.nbytes <= limit or len(s.tensors) == 1  # only a single tensor larger than the limit may exceed it
        names = [x.name for x in s.specs]
        for n in names:
            if n.endswith(".weight_scale"):
                assert n.replace("_scale", "") in names
    assert [x.name for s in shards for x in s.specs] == [x.name for s in plan_shards(sources, CFG, limit) for x in s.specs]
    assert [s.name for s in plan_shards(sources, CFG, 10**12)] == ["model.safetensors"]


def test_existing_output_is_refused_then_overwritten(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = ptqtp.TritPlaneConfig(method="rtn-ternary")
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        quantize_checkpoint(src, out, cfg, show_progress=False)
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    quantize_checkpoint(src, out, cfg, overwrite=True, show_progress=False)
    assert (out / "notes.txt").read_text() == "mine"  # only what ptqtp writes is replaced
    assert not (out / "model-00001-of-00009.safetensors").exists()
    ckpt.validate_checkpoint(out)
    # resuming a finished run is a no-op; resuming with other options is refused
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    quantize_checkpoint(src, out, cfg, resume=True, show_progress=False)
    assert before == {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    with pytest.raises(OutputExistsError, match="other options"):
        quantize_checkpoint(src, out, cfg.replace(group_size=64), resume=True, show_progress=False)


# ------------------------------------------------------------------------------- resume only what this run made

RTN = ptqtp.TritPlaneConfig(method="rtn-ternary")  # the cheapest solve: these tests are about the directory


def _tree(d: pathlib.Path) -> dict[str, str]:
    """Every file under `d`, hidden ones included: relative path -> sha256 (a refused run must change none)."""
    return {str(p.relative_to(d)): ckpt.file_sha256(p) for p in sorted(d.rglob("*")) if p.is_file()}


def _other_weights(src: pathlib.Path, dst: pathlib.Path, name: str) -> pathlib.Path:
    """A copy of the model `src` in which tensor `name` has other values: same files, names, sizes and headers
    (its bytes are flipped in place), so only the content tells the two apart."""
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    header = ckpt.read_header(path)
    begin, end = header.offsets[name]
    raw = bytearray(path.read_bytes())
    for i in range(header.data_start + begin + 3, header.data_start + end, 4):  # float32: flip the sign bits
        raw[i] ^= 0x80
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == (src / "model.safetensors").stat().st_size
    return dst


def _interrupted(src, out, after_writes: int, monkeypatch, **kw) -> dict:
    """Run into `out` and stop it (as Ctrl-C would) after `after_writes` tensors; returns its manifest."""
    real, calls = ckpt.ShardWriter.write, []

    def write(self, name, tensor):
        calls.append(name)
        if len(calls) > after_writes:
            raise KeyboardInterrupt
        return real(self, name, tensor)

    monkeypatch.setattr(ckpt.ShardWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, out, RTN, show_progress=False, **kw)
    monkeypatch.setattr(ckpt.ShardWriter, "write", real)
    return json.loads((out / "ptqtp_manifest.json").read_text())


def test_resume_of_a_finished_run_checks_the_source_content(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    report = quantize_checkpoint(src, out, RTN, show_progress=False)
    assert quantize_checkpoint(shutil.copytree(src, tmp_path / "moved"), out, RTN, resume=True,
                               show_progress=False) == report  # the same content elsewhere is the same run
    other = _other_weights(src, tmp_path / "other", "model.layers.1.mlp.up_proj.weight")
    before = _tree(out)
    with pytest.raises(OutputExistsError, match="other weights.*--overwrite"):
        quantize_checkpoint(other, out, RTN, resume=True, show_progress=False)
    assert _tree(out) == before


def test_resume_of_an_interrupted_run_checks_the_content_of_every_shard_it_keeps(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """Shards already written must come from the same bytes; shards still to write follow the source given."""
    src = tiny_model_dir("llama")
    kw = dict(max_shard_size="60KB")
    shards = plan_shards(loader.list_tensors(src, RTN), RTN, 60_000)
    out = tmp_path / "cut"
    manifest = _interrupted(src, out, 12, monkeypatch, **kw)
    done = set(manifest["shards"])
    assert 1 <= len(done) < len(shards) - 1
    in_done = next(p.source.name for s in shards if s.name in done for p in s.tensors if p.source.action != "dense")
    in_last = next(p.source.name for p in shards[-1].tensors if p.source.action != "dense")

    changed = _other_weights(src, tmp_path / "changed", in_done)
    before = _tree(out)
    with pytest.raises(OutputExistsError, match=f"another source: {re.escape(in_done)} of .* differs"):
        quantize_checkpoint(changed, out, RTN, resume=True, show_progress=False, **kw)
    assert _tree(out) == before

    later = _other_weights(src, tmp_path / "later", in_last)  # differs only where nothing was written yet
    quantize_checkpoint(later, out, RTN, resume=True, show_progress=False, **kw)
    quantize_checkpoint(later, tmp_path / "whole", RTN, show_progress=False, **kw)
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name
    assert json.loads((out / "ptqtp_report.json").read_text())["totals"]["shards_resumed"] == len(done)


@pytest.mark.parametrize("calib", [None, "boolq"])
@pytest.mark.parametrize("kind", ["dense model", "other files"])
def test_resume_into_a_directory_without_a_ptqtp_run_changes_nothing(kind, calib, tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    target = tmp_path / "target"
    if kind == "dense model":
        shutil.copytree(tiny_model_dir("qwen3"), target)
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        (target / "model.safetensors").write_bytes(b"not a model")
    before = _tree(target)
    with pytest.raises(OutputExistsError, match="holds no ptqtp run to resume.*--overwrite"):
        quantize_checkpoint(src, target, RTN, resume=True, show_progress=False, calib=calib, calib_samples=1,
                            calib_seq_len=16)
    assert _tree(target) == before and sorted(p.name for p in target.iterdir()) == sorted(before)


def test_an_unreadable_manifest_is_refused_not_restarted_in_place(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "ptqtp_manifest.json").write_text("{cut sho")
    (out / "model.safetensors").write_bytes(b"someone's")
    before = _tree(out)
    with pytest.raises(OutputExistsError, match="ptqtp_manifest.json is unreadable.*--overwrite"):
        quantize_checkpoint(tiny_model_dir("llama"), out, RTN, resume=True, show_progress=False)
    assert _tree(out) == before


@pytest.mark.parametrize("left, calib, expect", [
    (".calib-partial", None, "holds an interrupted calibrated run; resume it with the same --calib options"),
    ("ptqtp_manifest.json", "boolq", "holds an interrupted run without --calib; resume it without --calib"),
])
def test_an_interrupted_run_resumes_only_in_its_own_mode(left, calib, expect, tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    if left.endswith(".json"):
        (out / left).write_text(json.dumps({"fingerprint": "x", "shards": {}}))
    else:
        (out / left).mkdir()
        (out / left / "layer-00000.safetensors").write_bytes(b"a layer")
    before = _tree(out)
    with pytest.raises(OutputExistsError, match=re.escape(expect)):
        quantize_checkpoint(tiny_model_dir("llama"), out, RTN, resume=True, show_progress=False, calib=calib,
                            calib_samples=1, calib_seq_len=16)
    assert _tree(out) == before


# ------------------------------------------------------------------------------------------------- the lock


def test_a_second_lock_holder_is_told_who_holds_it(tmp_path):
    with OutputLock(tmp_path):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        with pytest.raises(OutputBusyError, match=f"another ptqtp run \\(pid {os.getpid()} on "
                                                  f"{re.escape(socket.gethostname())}, started "):
            OutputLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_NAME).exists()
    with OutputLock(tmp_path):  # free again
        pass


def test_a_lock_left_by_a_dead_run_is_taken_over(tiny_model_dir, tmp_path):
    """What decides is the kernel's lock, not the pid written in the file (pids are reused): a lock file that no
    live process holds, even one naming a live pid, is taken over."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid in (int(dead.stdout), os.getpid()):
        out = tmp_path / f"q{pid}"
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
        quantize_checkpoint(tiny_model_dir("llama"), out, RTN, resume=True, show_progress=False)
        ckpt.validate_checkpoint(out)
        assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_second_run_into_the_same_output_is_refused_and_the_first_finishes_intact(flag, tiny_model_dir, tmp_path,
                                                                                   capsys):
    from ptqtp.cli import main

    src = tiny_model_dir("llama")
    opts = ["--method", "rtn-ternary", "--max-shard-size", "60KB", "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["quantize", str(src), "-o", str(ref), *opts]) == 0
    slow = [sys.executable, str(pathlib.Path(__file__).with_name("slow_quantize.py")), "0.15", "quantize"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*slow, str(src), "-o", str(out), *opts], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "ptqtp_manifest.json").is_file():
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        assert main(["quantize", str(src), "-o", str(out), *opts, flag]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"being written by another ptqtp run (pid {first.pid} on " in lines[0], lines
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == \
        {p.name: p.read_bytes() for p in ref.glob("*.safetensors")}
    assert not (out / LOCK_NAME).exists()
