"""The command line as a user meets it: the embedded default, info, and bad inputs
(one line on stderr, non-zero exit, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from longvita.cli import main


def _run(*args, env=None):
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)  # a user's shell: the demo runs the CPU reference path
    e.update(env or {})
    # run outside the repo so `-m longvita` imports the installed package, as a user's would
    return subprocess.run(
        [sys.executable, "-m", "longvita", *args], capture_output=True, text=True, env=e, timeout=300,
        cwd=tempfile.gettempdir(),
    )


def test_generate_default_json_subprocess():
    r = _run("generate", "--json", "--max-new-tokens", "5", "--seed", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) >= 1 and all(isinstance(t, int) for t in out["tokens"])
    assert out["tiles"] >= 1 and out["tokens_per_s"] > 0
    # same seed, same tokens
    r2 = _run("generate", "--json", "--max-new-tokens", "5", "--seed", "3")
    assert json.loads(r2.stdout)["tokens"] == out["tokens"]


def test_info_subprocess():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    for word in ("torch", "triton", "native extension", "varlen_attention="):
        assert word in r.stdout


def test_missing_checkpoint_is_one_line(tmp_path):
    r = _run("generate", "--model", str(tmp_path / "missing"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_image_names_the_file(tmp_path, capsys, kind):
    path = tmp_path / "pic.png"
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    code = main(["generate", "--image", str(path), "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "pic.png" in err[0]


def test_corrupt_video_names_the_file(tmp_path, capsys):
    pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
    code = main(["generate", "--video", str(path), "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "clip.mp4" in err[0]


def test_corrupt_checkpoint_names_the_file(tmp_path, capsys):
    from longvita.model import LongVITA, preset

    LongVITA(preset("tiny")).save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    code = main(["generate", "--model", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "model.safetensors" in err[0]


def test_generate_from_saved_checkpoint_with_tokenizer(tmp_path, capsys):
    """A real checkpoint folder goes through the same code as the embedded default."""
    from longvita.data import build_default_tokenizer
    from longvita.model import LongVITA, preset

    torch.manual_seed(0)
    LongVITA(preset("tiny")).save_pretrained(str(tmp_path))
    build_default_tokenizer().save(str(tmp_path / "tokenizer.json"))
    code = main(["generate", "--model", str(tmp_path), "--json", "--max-new-tokens", "3", "--prompt", "hi"])
    out = capsys.readouterr().out
    assert code == 0
    assert len(json.loads(out)["tokens"]) >= 1


def _tiny_checkpoint(folder, preprocess):
    from longvita.data import build_default_tokenizer
    from longvita.model import LongVITA, preset

    torch.manual_seed(0)
    tok = build_default_tokenizer()
    cfg = preset("tiny")
    cfg.text.vocab_size = tok.get_vocab_size()
    cfg.preprocess = preprocess
    LongVITA(cfg).save_pretrained(str(folder))
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_preprocess_follows_checkpoint_and_flag(tmp_path, capsys):
    """The checkpoint's family is used without flags; --preprocess overrides it. The
    96x144 test picture makes a 2x3 grid: long-vita lays out 7 tile blocks with newlines,
    internvl one block of 7 tiles, so the prompt lengths differ."""
    from PIL import Image

    image = tmp_path / "pic.png"
    Image.new("RGB", (144, 96), (10, 200, 30)).save(image)
    runs = {}
    for stored in ("long-vita", "internvl"):
        folder = _tiny_checkpoint(tmp_path / stored, stored)
        for flag in (None, "internvl" if stored == "long-vita" else "long-vita"):
            argv = ["generate", "--model", str(folder), "--image", str(image), "--json", "--max-new-tokens", "1"]
            code = main(argv + (["--preprocess", flag] if flag else []))
            out = json.loads(capsys.readouterr().out)
            assert code == 0 and out["preprocess"] == (flag or stored) and out["tiles"] == 7
            runs[stored, flag] = out["prompt_tokens"]
    assert runs["long-vita", None] == runs["internvl", "long-vita"]
    assert runs["internvl", None] == runs["long-vita", "internvl"]
    # long-vita: 7 blocks with their own <img>/<patch> start and end tokens plus a newline
    # per grid row; internvl: one <img>...</img> around all 7 tiles
    newline = 1  # the built-in byte-level tokenizer spells "\n" as one token
    assert runs["long-vita", None] - runs["internvl", None] == 6 * 2 + 2 * newline
    with pytest.raises(SystemExit):  # argparse rejects an unknown name
        main(["generate", "--preprocess", "llava"])


def test_cut_short_video_warns_once_and_reports_frames(tmp_path, capsys):
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:  # index first
        stream = out.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(20):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code = main(["generate", "--video", str(path), "--json", "--max-new-tokens", "1"])
    captured = capsys.readouterr()
    assert code == 0
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "clip.mp4" in err[0] and "of the 20 frames" in err[0]
    out = json.loads(captured.out)
    # 2 fps at 1 frame per second (long-vita): every other frame of those present
    assert out["frames"] and out["frames"] == list(range(0, 2 * len(out["frames"]), 2))
    assert out["tiles"] == len(out["frames"])
