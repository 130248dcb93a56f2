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
    """info names the backend each kernel really runs (a user's shell: no interpreter)."""
    r = _run("info")
    assert r.returncode == 0, r.stderr
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    probe = subprocess.run(
        [sys.executable, "-c", "import json, torch\n"
         "from longvita.kernels._backend import kernel_backends\n"
         "print(json.dumps({str(d).replace('torch.', ''): kernel_backends(torch.device('cpu'), d)"
         " for d in (torch.float32, torch.bfloat16)}))"],
        capture_output=True, text=True, env=e, timeout=300, cwd=tempfile.gettempdir(),
    )
    expected = json.loads(probe.stdout)
    from longvita._ext import native

    # on a CPU the pixel shuffle runs the C++ path when the extension is built (what the
    # old info got wrong), the others their torch paths
    assert expected["float32"]["pixel_shuffle"] == ("cpp" if native() is not None else "torch")
    assert expected["float32"]["varlen_attention"] == "torch"
    for dtype, backends in expected.items():
        line = f"cpu {dtype}: " + ", ".join(f"{k}={v}" for k, v in backends.items())
        assert line in r.stdout, (line, r.stdout)
    for word in ("torch", "triton", "native extension"):
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


# ------------------------------------------------------------------ arguments, before any loading


@pytest.mark.parametrize("flags,named", [
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--max-frames", "0"], "--max-frames"),
    (["--max-tiles", "0"], "--max-tiles"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--image", "/nonexistent/pic.png"], "--image"),
    (["--video", "/nonexistent/clip.mp4"], "--video"),
    (["--model", "/nonexistent/ckpt"], "--model"),
])
def test_bad_arguments_name_the_flag_before_loading(monkeypatch, capsys, flags, named):
    import longvita.pipeline

    def _must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(longvita.pipeline, "load_pipeline", _must_not_load)
    code = main(["generate", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and named in err[0], err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    options = " ".join(out[out.index("options:"):].split())
    for flag, default in (("--max-new-tokens", "16"), ("--max-tiles", "12"), ("--max-frames", "4096"),
                          ("--dtype", "float32"), ("--device", "cpu")):
        entry = options[options.index(flag + " "):]
        entry = entry[: entry.find(" --", len(flag))]  # up to the next flag
        assert f"(default: {default})" in entry, (flag, entry)


def test_unknown_flag_is_one_line():
    r = _run("generate", "--bogus")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--bogus" in r.stderr


def test_json_reports_load_prefill_decode_times(capsys):
    code = main(["generate", "--json", "--max-new-tokens", "3"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("load_s", "prefill_s", "decode_s", "decode_tokens_per_s"):
        assert out[key] >= 0, key
    assert out["prefill_s"] > 0  # the prefill ran (the first token comes out of it)


def test_saved_checkpoint_with_tokenizer_round_trips(tmp_path, capsys):
    """save_pretrained(tokenizer=...) writes a folder `generate --model` can use as it is."""
    from longvita.data import build_default_tokenizer
    from longvita.pipeline import random_tiny_model

    tok = build_default_tokenizer()
    model = random_tiny_model(tok.get_vocab_size(), seed=5)
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    assert (tmp_path / "tokenizer.json").exists()
    from longvita.data.synthetic import synthetic_picture

    synthetic_picture(1).save(tmp_path / "pic.png")
    args = ["generate", "--json", "--max-new-tokens", "4", "--seed", "5", "--prompt", "hi", "--image", str(tmp_path / "pic.png")]
    assert main(args + ["--model", str(tmp_path)]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main(args + ["--model", "tiny"]) == 0  # the random tiny model from the same seed
    embedded = json.loads(capsys.readouterr().out)
    assert from_folder["tokens"] == embedded["tokens"]


def test_prompt_longer_than_the_model_is_one_line(tmp_path, capsys):
    from longvita.data import build_default_tokenizer
    from longvita.pipeline import random_tiny_model

    tok = build_default_tokenizer()
    model = random_tiny_model(tok.get_vocab_size())
    model.config.text.max_position_embeddings = 64
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    code = main(["generate", "--model", str(tmp_path), "--prompt", "x" * 200])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "max_position_embeddings (64)" in err[0], err


def test_bad_config_names_the_folder(tmp_path, capsys):
    from longvita.model import LongVITA, preset

    folder = tmp_path / "my-ckpt"
    LongVITA(preset("tiny")).save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    code = main(["generate", "--model", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "my-ckpt" in err[0] and "llama" in err[0], err


def test_torchrun_bad_input_prints_once(tmp_path):
    """Every rank sees the same bad input: the error line appears once, from rank 0."""
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
         "-m", "longvita", "generate", "--image", str(tmp_path / "missing.png")],
        capture_output=True, text=True, env=e, timeout=300, cwd=tempfile.gettempdir(),
    )
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "longvita generate: error:" in ln]
    assert len(lines) == 1 and "missing.png" in lines[0], r.stderr


@pytest.mark.parametrize("flags,named", [
    (["--prefill-chunk", "0"], "--prefill-chunk"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-2"], "--top-k"),
    (["--cp", "3"], "--cp"),
])
def test_bad_generation_flags_are_one_line(capsys, flags, named):
    code = main(["generate", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and named in err[0], err


def test_prefill_chunk_gives_the_same_tokens(capsys):
    args = ["generate", "--json", "--max-new-tokens", "4", "--seed", "2"]
    assert main(args) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(args + ["--prefill-chunk", "5"]) == 0  # cuts through the tiles' tokens
    chunked = json.loads(capsys.readouterr().out)
    assert chunked["tokens"] == whole["tokens"] and chunked["kv_tokens"] == whole["kv_tokens"]


def test_generate_under_torchrun_is_context_parallel():
    """2 ranks: one CP group, the same tokens as one process, the cache split in two."""
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    # sampled: the ranks' generators must stay in step with a single-process run
    args = ["generate", "--json", "--max-new-tokens", "4", "--seed", "4", "--temperature", "0.8", "--top-k", "50"]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "longvita", *args],
        capture_output=True, text=True, env=e, timeout=300, cwd=tempfile.gettempdir(),
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout  # rank 0 prints
    cp = json.loads(lines[0])
    one = json.loads(_run(*args).stdout)
    assert cp["cp"] == 2 and len(cp["kv_tokens"]) == 2 and len(cp["peak_memory_gib"]) == 2
    assert sum(cp["kv_tokens"]) == one["kv_tokens"][0] == one["prompt_tokens"] + len(one["tokens"]) - 1
    assert abs(cp["kv_tokens"][0] - cp["kv_tokens"][1]) <= 3
    assert cp["tokens"] == one["tokens"]


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
    pytest.importorskip("av")
    from _dist import write_mp4

    path = write_mp4(tmp_path / "clip.mp4", n_frames=20, fps=2, seed=0, faststart=True)  # index first
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


def test_readme_cp_example_runs(tmp_path):
    """The README's context-parallel example runs as written under torchrun (2 gloo ranks)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = readme.split("<!-- example: cp-generate -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(block)
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, env=e, timeout=300, cwd=tempfile.gettempdir(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import re

    # rank 0 printed the text and the per-rank cache sizes: two shards of about half each
    kv = re.search(r"\[(\d+), (\d+)\]\s*$", r.stdout)
    assert kv is not None, r.stdout
    a, b = int(kv.group(1)), int(kv.group(2))
    assert a > 0 and b > 0 and abs(a - b) <= 3


@pytest.mark.parametrize("model", [[], ["--model", "tiny"]], ids=["embedded", "tiny-random-init"])
def test_generate_never_imports_dynamo(model):
    """The whole eager CPU generate — import, model construction (random init for tiny),
    weight load, prefill, decode — never imports torch._dynamo (1.4 s of a 1.44 s load once:
    issue 30), in a fresh process as a user runs it."""
    code = (
        "import sys\n"
        "import longvita\n"
        "assert 'torch._dynamo' not in sys.modules, 'import longvita'\n"
        "from longvita.cli import main\n"
        f"assert main(['generate', '--max-new-tokens', '2', '--json'] + {model!r}) == 0\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_embedded_demo_states_its_trained_length_and_generate_warns_past_it():
    """The shipped demo model was trained on packs of the demo recipe's length; its config says
    so (longvita_trained_length), and a prompt past it gets one warning line on stderr (the
    answer still comes, exit 0); a prompt within it gets none."""
    from longvita.model.checkpoint import read_config
    from longvita.pipeline import EMBEDDED_DEMO
    from longvita.runtime.train.recipe import DEMO_SEQ_LEN

    assert read_config(str(EMBEDDED_DEMO)).trained_length == DEMO_SEQ_LEN
    long_prompt = "the quick brown fox jumps over the lazy dog. " * 30  # > 1,024 tokens, < the positions
    r = _run("generate", "--prompt", long_prompt, "--max-new-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "trained" in line]
    assert len(warned) == 1 and str(DEMO_SEQ_LEN) in warned[0], r.stderr
    assert len(r.stdout.strip().splitlines()) == 1  # --json: still one line
    r = _run("generate", "--prompt", "what is in the picture?", "--max-new-tokens", "2", "--json")
    assert r.returncode == 0 and "trained" not in r.stderr, r.stderr
