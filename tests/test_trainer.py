"""The trainer and ``longvita train`` on the tiny model and the synthetic set (CPU, fp32):
exact resume, a checkpoint write cut off, stage 1's frozen modules, a falling loss, a
missing image, the NaN stop, the final model loading in ``generate``, and 2 CP ranks
equal to 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longvita.cli import main
from longvita.data import MediaConfig, pack_stream
from longvita.pipeline import load_pipeline
from longvita.runtime.train import checkpoint as checkpoint_mod
from longvita.runtime.train import trainer as trainer_mod
from longvita.runtime.train.recipe import apply_overrides, load_config, recipe

SEQ = "200"
# a stage-2 run whose steps move the weights visibly: every module trained at 1e-3
FAST = ["--stage", "2", "--seq-len", SEQ, "--set", "lr_llm=1e-3", "lr_projector=1e-3", "lr_vision=1e-3",
        "warmup_steps=1"]


@pytest.fixture(scope="module", autouse=True)
def _user_backends():
    """The CPU torch paths, not Triton's interpreter (which the kernel tests cover; it would
    make these steps a hundred times slower). TRITON_INTERPRET itself stays as conftest set
    it: triton may already be imported in this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGVITA_BACKEND", "torch")
        yield


def _train(capsys, out, *extra) -> tuple[int, list[dict], str]:
    capsys.readouterr()
    rc = main(["train", *FAST, "--json", "--out", str(out), *extra])
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines() if x.startswith("{")]
    return rc, lines, captured.err


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 steps in one run (the reference for the resume tests); shares one synthetic set."""
    out = tmp_path_factory.mktemp("straight")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["train", *FAST, "--json", "--out", str(out), "--steps", "4"])
    assert rc == 0
    lines = [json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{")]
    return out, lines


def test_resume_is_bit_exact(straight, tmp_path, capsys, monkeypatch):
    """4 steps = 2 steps, a stop (preemption), --resume, 2 steps: same losses and weights, bit for bit."""
    ref_out, ref = straight
    assert [x["step"] for x in ref] == [1, 2, 3, 4]
    real = trainer_mod.Trainer.train_step

    def preempted(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", preempted)
    rc, first, _ = _train(capsys, tmp_path, "--steps", "4", "--checkpoint-every", "2")
    assert rc == 130 and [x["step"] for x in first] == [1, 2]
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real)
    rc, second, _ = _train(capsys, tmp_path, "--steps", "4", "--checkpoint-every", "2", "--resume")
    assert rc == 0 and [x["step"] for x in second] == [3, 4]
    assert [x["loss"] for x in first + second] == [x["loss"] for x in ref]
    assert [x["lr"] for x in first + second] == [x["lr"] for x in ref]
    want, got = _weights(ref_out / "final"), _weights(tmp_path / "final")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_killed_checkpoint_write_resumes_from_previous(straight, tmp_path, capsys, monkeypatch):
    """The rename of step 4's checkpoint never happens (killed mid-write): the temp folder is
    ignored, --resume starts from step 2 and ends where the straight run ended."""
    _, ref = straight
    real = checkpoint_mod.CheckpointManager._publish

    def killed(tmp, final):
        if final.name == "step-0000004":
            raise KeyboardInterrupt
        return real(tmp, final)

    monkeypatch.setattr(checkpoint_mod.CheckpointManager, "_publish", staticmethod(killed))
    rc, first, _ = _train(capsys, tmp_path, "--steps", "4", "--checkpoint-every", "2")
    assert rc == 130 and len(first) == 4
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-0000002", "step-0000004.tmp"]
    assert checkpoint_mod.latest_checkpoint(tmp_path).name == "step-0000002"
    assert not (tmp_path / "final").exists()
    monkeypatch.setattr(checkpoint_mod.CheckpointManager, "_publish", staticmethod(real))
    rc, second, err = _train(capsys, tmp_path, "--steps", "4", "--checkpoint-every", "2", "--resume")
    assert rc == 0, err
    assert [x["loss"] for x in second] == [x["loss"] for x in ref[2:]]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_stage1_trains_only_the_projector(tmp_path):
    from longvita.data.synthetic import write_synthetic_dataset
    from longvita.pipeline import load_pipeline

    pipe = load_pipeline("tiny", seed=1)
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    manifest = write_synthetic_dataset(tmp_path / "data", 16, 1, image_size=pipe.model.config.vision.image_size)
    r = apply_overrides(recipe(1), {"seq_len": 200, "warmup_steps": 0})
    stream = pack_stream(manifest, pipe.tokenizer, pipe.special, MediaConfig.for_model(pipe.model.config),
                         seq_len=r.seq_len, reset=r.reset)
    t = trainer_mod.Trainer(pipe.model, pipe.tokenizer, r, stream, steps=2, out=tmp_path / "run")
    assert {g["name"] for g in t.optimizer.param_groups} == {"projector"}
    assert all(g["lr"] == 1e-3 for g in t.optimizer.param_groups)
    list(t.run())
    after = pipe.model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == name.startswith("projector."), name


def test_param_groups_layer_decay():
    from longvita.model import LongVITA, preset

    model = LongVITA(preset("tiny"))
    lrs = {g["name"]: g["lr"] for g in trainer_mod.param_groups(model, recipe(2))}
    assert lrs["vision.layer1"] == pytest.approx(1e-6) and lrs["vision.layer0"] == pytest.approx(0.9e-6)
    assert lrs["vision.embed"] == pytest.approx(0.81e-6)
    assert lrs["projector"] == lrs["llm"] == pytest.approx(1e-5)
    release = trainer_mod.param_groups(model, recipe(4, "long-vita-release"))
    assert {g["name"]: g["lr"] for g in release} == {"projector": 5e-6, "llm": 5e-6}
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_recipe_presets_and_overrides(tmp_path):
    assert [recipe(s).seq_len for s in (1, 2, 3, 4)] == [32768, 16384, 131072, 1048576]
    assert [recipe(s).reset for s in (1, 2, 3, 4)] == [True, True, False, False]
    one = recipe(1)
    assert (one.train_vision, one.train_projector, one.train_llm, one.lr_projector) == (False, True, False, 1e-3)
    assert (one.grad_clip, one.weight_decay, one.beta1, one.beta2) == (1.0, 0.0, 0.9, 0.999)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lr-llm": 2e-5, "reset": False}))
    r = apply_overrides(recipe(2), load_config(cfg))
    assert r.lr_llm == 2e-5 and r.reset is False
    with pytest.raises(ValueError, match="unknown recipe key 'nope'"):
        apply_overrides(r, ["nope=1"])
    with pytest.raises(ValueError, match="beta1"):
        apply_overrides(r, ["beta1=2"])
    # activation checkpointing: auto recomputes every layer from 16K-token packs
    assert [recipe(s).ac_policy() for s in (1, 2, 3, 4)] == ["full"] * 4
    assert apply_overrides(recipe(1), {"seq_len": 1024}).ac_policy() == "none"
    assert apply_overrides(recipe(1), {"activation_checkpointing": "mlp"}).ac_policy() == "mlp"
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        apply_overrides(r, {"activation_checkpointing": "selective"})
    pytest.importorskip("yaml")
    y = tmp_path / "c.yaml"
    y.write_text("lr_vision: 3.0e-6\nwarmup_steps: 5\n")
    assert apply_overrides(r, load_config(y)).warmup_steps == 5


def test_loss_falls(tmp_path, capsys):
    rc, lines, err = _train(capsys, tmp_path, "--steps", "24", "--set", "lr_llm=3e-3", "lr_projector=3e-3",
                            "lr_vision=1e-3", "warmup_steps=2")
    assert rc == 0, err
    losses = [x["loss"] for x in lines]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first, losses


def test_missing_image_is_skipped_and_reported(tmp_path, capsys):
    from longvita.data.synthetic import write_synthetic_dataset

    # 3 samples: 3 steps (at least one sample each) pass the whole epoch, the broken one included
    manifest = write_synthetic_dataset(tmp_path / "data", 3, 3, image_size=56, videos=False)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    victim = next(r["images"][0] for r in rows if r.get("images"))
    (manifest.parent / victim).unlink()
    rc, lines, err = _train(capsys, tmp_path / "run", "--steps", "3", "--data", str(manifest))
    assert rc == 0, err
    skipped = [s for x in lines for s in x["skipped_media"]]
    assert skipped and any(Path(victim).name in s for s in skipped), lines
    assert "warning" in err and Path(victim).name in err


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path, capsys, monkeypatch):
    real = trainer_mod.packed_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(trainer_mod, "packed_loss", poisoned)
    rc, lines, err = _train(capsys, tmp_path, "--steps", "4", "--checkpoint-every", "2")
    assert rc == 1 and len(lines) == 2
    msg = [x for x in err.splitlines() if "error" in x]
    assert len(msg) == 1 and "step 3: the loss is nan" in msg[0] and "step-0000002" in msg[0], err
    assert checkpoint_mod.latest_checkpoint(tmp_path).name == "step-0000002"
    assert not (tmp_path / "final").exists()


def test_train_arguments_checked_before_loading(tmp_path, capsys):
    for argv, want in [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--cp", "2"], "--cp 2 must divide"),
        (["--resume"], "--resume: no complete checkpoint"),
        (["--data", str(tmp_path / "none.jsonl")], "--data"),
        (["--model", str(tmp_path / "nope")], "--model"),
        (["--set", "lr_llm=abc"], "--set: lr_llm"),
        (["--keep", "0"], "--keep"),
    ]:
        capsys.readouterr()
        assert main(["train", "--out", str(tmp_path / "o"), *argv]) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], (argv, err)


def test_train_then_generate(straight, capsys):
    out, _ = straight
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "final"), "--max-new-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # a trained model may end its answer early (it learnt where answers stop): then the
    # last token is the folder's end-of-turn token
    eos = load_pipeline(str(out / "final")).special.eos_token_id
    tokens = result["tokens"]
    assert 1 <= len(tokens) <= 3 and (len(tokens) == 3 or tokens[-1] == eos), (tokens, eos)


def _torchrun(ranks: int, *args) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "longvita", "train", *FAST, "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def test_two_cp_ranks_equal_one(straight, tmp_path):
    """torchrun with 2 gloo ranks and --cp 2: the same step losses as one process."""
    _, ref = straight
    lines = _torchrun(2, "--steps", "4", "--cp", "2", "--out", str(tmp_path))
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # printed once (rank 0)
    for got, want in zip(lines, ref):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), (got, want)
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_fsdp_checkpoint_resumes_exactly(tmp_path):
    """2 ranks with --cp 1 (FSDP2, sharded checkpoints through torch.distributed.checkpoint):
    resuming from step 2 repeats steps 3-4 and the final weights bit for bit."""
    args = ["--steps", "4", "--cp", "1", "--checkpoint-every", "2", "--out", str(tmp_path)]
    ref = _torchrun(2, *args)
    assert (tmp_path / "checkpoints" / "step-0000004" / "dcp").is_dir()
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "step-0000004")
    (tmp_path / "final").rename(tmp_path / "final-straight")
    again = _torchrun(2, *args, "--resume")
    assert [x["loss"] for x in again] == [x["loss"] for x in ref[2:]]
    want, got = _weights(tmp_path / "final-straight"), _weights(tmp_path / "final")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_resume_with_other_steps_is_refused(straight, capsys):
    out, _ = straight
    capsys.readouterr()
    assert main(["train", *FAST, "--out", str(out), "--steps", "6", "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "started with 4 steps, not 6" in err[0], err


def test_config_file_sets_recipe_and_flags(tmp_path, capsys):
    """--config holds recipe keys and train flags; a flag on the command line wins."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"steps": 2, "seed": 5, "lr_llm": 2e-3, "warmup_steps": 0, "keep": 1}))
    capsys.readouterr()
    rc = main(["train", "--stage", "2", "--seq-len", SEQ, "--json", "--out", str(tmp_path / "a"),
               "--config", str(cfg), "--seed", "0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = [json.loads(x) for x in out.out.splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["lr"] == 2e-3
    assert len(list((tmp_path / "a" / "checkpoints").iterdir())) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr_llm": "fast"}))
    rc, _, err = _train(capsys, tmp_path / "b", "--config", str(bad))
    assert rc == 1 and err.strip().count("\n") == 0 and "--config" in err and "lr_llm" in err


def test_fsdp_step_with_and_without_media(tmp_path):
    """FSDP2 over 2 data-parallel ranks where one rank's pack has images and the other's
    none: the media-less rank runs the vision tower on a black tile with weight 0
    (``embed_rows(touch_vision=True)``), so both take part in the vision blocks'
    collectives (without it the run aborts)."""
    from longvita.data.synthetic import write_synthetic_dataset
    from longvita.pipeline import load_pipeline

    manifest = write_synthetic_dataset(tmp_path / "data", 6, 2, image_size=56, videos=False)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    text = {"role": "user", "content": "count " + " ".join(str(j) for j in range(40))}
    rows += [{"source": "text", "messages": [text, {"role": "assistant", "content": "done " * 20}]}] * 6
    mixed = manifest.parent / "mixed.jsonl"  # media paths are relative to the manifest
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = load_pipeline("tiny")
    # each data-parallel group reads its own strided half of the samples (PackStream.shard)
    has_media = []
    for group in range(2):
        stream = pack_stream(mixed, pipe.tokenizer, pipe.special, MediaConfig.for_model(pipe.model.config),
                             seq_len=int(SEQ), reset=True).shard(group, 2)
        has_media.append([stream.next_pack().pixel_values is not None for _ in range(4)])
    assert any(a != b for a, b in zip(*has_media)), has_media  # a mixed step happens
    lines = _torchrun(2, "--steps", "4", "--cp", "1", "--data", str(mixed), "--out", str(tmp_path / "run"))
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(math.isfinite(x["loss"]) for x in lines)


def test_activation_checkpointing_flag_gives_the_same_steps(tmp_path, capsys):
    """--activation-checkpointing on recomputes layers in the backward: same losses."""
    rc, plain, err = _train(capsys, tmp_path / "plain", "--steps", "2", "--activation-checkpointing", "off")
    assert rc == 0, err
    rc, ac, err = _train(capsys, tmp_path / "ac", "--steps", "2", "--activation-checkpointing", "on")
    assert rc == 0, err
    assert [x["loss"] for x in ac] == pytest.approx([x["loss"] for x in plain], rel=1e-6)
    assert [x["grad_norm"] for x in ac] == pytest.approx([x["grad_norm"] for x in plain], rel=1e-5)
    rc, mlp, err = _train(capsys, tmp_path / "mlp", "--steps", "2", "--activation-checkpointing", "mlp")
    assert rc == 0, err
    assert [x["loss"] for x in mlp] == pytest.approx([x["loss"] for x in plain], rel=1e-6)
    with pytest.raises(SystemExit) as e:
        _train(capsys, tmp_path / "bad", "--steps", "2", "--activation-checkpointing", "sometimes")
    assert e.value.code != 0 and "--activation-checkpointing" in capsys.readouterr().err


def test_bf16_precision_trains_close_to_fp32(tmp_path, capsys):
    """--precision bf16: bf16 compute (autocast) over fp32 master weights; the first
    step's loss is fp32's within bf16 rounding, and the final weights stay fp32."""
    rc, fp32, err = _train(capsys, tmp_path / "fp32", "--steps", "2")
    assert rc == 0, err
    rc, bf16, err = _train(capsys, tmp_path / "bf16", "--steps", "2", "--precision", "bf16")
    assert rc == 0, err
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)
    assert bf16[0]["loss"] != fp32[0]["loss"]  # it really computed in bf16
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "bf16" / "final").values())


def test_recipe_loss_options_reach_the_loss(tmp_path, capsys):
    """--set z_loss=... / label_smoothing=...: the first step's loss is the plain one plus
    what the option adds (z-loss: a positive term; smoothing: the cross-entropy against a
    smoothed target, larger for a model that is not uniform yet)."""
    rc, plain, err = _train(capsys, tmp_path / "plain", "--steps", "1")
    assert rc == 0, err
    rc, z, err = _train(capsys, tmp_path / "z", "--steps", "1", "--set", "z_loss=0.5")
    assert rc == 0, err
    rc, smooth, err = _train(capsys, tmp_path / "s", "--steps", "1", "--set", "label_smoothing=0.5")
    assert rc == 0, err
    assert z[0]["loss"] > plain[0]["loss"] + 0.1 and smooth[0]["loss"] != plain[0]["loss"]
    rc, _, err = _train(capsys, tmp_path / "bad", "--steps", "1", "--set", "label_smoothing=2")
    assert rc == 1 and "label_smoothing" in err
