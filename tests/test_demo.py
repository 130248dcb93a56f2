"""The demo model: its generated data, its recipe, its evaluation and (when the package
ships it) the trained weights' accuracy and the default `longvita generate` answer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from longvita.cli import main
from longvita.data.demo import demo_picture
from longvita.data.demo import TASK_WEIGHTS, TASKS, demo_examples, make_example, write_demo_dataset
from longvita.pipeline import DEMO_SOURCE, EMBEDDED_DEMO, embedded_demo_available, load_pipeline

@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    """As a user's shell runs them (the recorded run did): Triton's interpreter would only
    make these model-sized runs slow; the kernels have their own tests."""
    monkeypatch.setenv("LONGVITA_BACKEND", "torch")


needs_demo = pytest.mark.skipif(not embedded_demo_available(), reason="the package ships no trained demo model")


def _have_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):  # (an mp4 muxer may stamp its files)
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_dataset_is_deterministic_and_covers_every_task(tmp_path):
    n = sum(TASK_WEIGHTS.values())  # one cycle of the task schedule
    a = write_demo_dataset(tmp_path / "a", n, seed=3, warmup=0)
    b = write_demo_dataset(tmp_path / "b", n, seed=3, warmup=0)
    assert a.read_text() == b.read_text()
    assert _digest(tmp_path / "a" / "media") == _digest(tmp_path / "b" / "media")
    records = [json.loads(line) for line in a.read_text().splitlines()]
    want = set(TASKS) if _have_av() else set(TASKS) - {"frame"}
    assert {r["source"].removeprefix("demo-") for r in records} == want
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        n_media = r["messages"][0]["content"].count("<image>") + r["messages"][0]["content"].count("<video>")
        assert n_media == len(r.get("images", [])) + len(r.get("videos", []))
        assert all("<image>" not in m["content"] for m in r["messages"][1:])  # follow-ups ask about the same media
    c = write_demo_dataset(tmp_path / "c", n, seed=4, warmup=0)
    assert c.read_text() != a.read_text()


def _digest_of(media, manifest) -> str:
    """_digest of the media files ``manifest`` names, read from ``media``."""
    h = hashlib.sha256()
    names = sorted({Path(p).name for r in map(json.loads, manifest.read_text().splitlines()) for p in r.get("images", [])})
    for name in names:
        h.update(name.encode())
        h.update((media / name).read_bytes())
    return h.hexdigest()


def test_dataset_follows_the_task_weights(tmp_path):
    weights = {"colour": 1, "count": 3, "retrieval": 2}
    records = [json.loads(line) for line in
               write_demo_dataset(tmp_path, 12, seed=0, weights=weights, videos=False, warmup=0).read_text().splitlines()]
    got = {}
    for r in records:
        got[r["source"].removeprefix("demo-")] = got.get(r["source"].removeprefix("demo-"), 0) + 1
    assert got == {t: 2 * w for t, w in weights.items()}
    with pytest.raises(ValueError, match="unknown task"):
        write_demo_dataset(tmp_path / "x", 2, weights={"colour": 1, "nope": 1})
    with pytest.raises(ValueError, match="no task"):
        write_demo_dataset(tmp_path / "y", 2, weights={"frame": 1}, videos=False)
    with pytest.raises(ValueError, match="warmup"):
        write_demo_dataset(tmp_path / "z", 2, warmup=-1)


def test_dataset_is_a_curriculum_read_in_order(tmp_path):
    """The set opens with the copy warm-up, then cycles of the task weights (each cycle
    shuffled); `train --recipe demo` reads it in the file's order."""
    from longvita.data.demo import WARMUP_TASK
    from longvita.data import MediaConfig, pack_stream

    weights = {"colour": 1, "repeat": 1, "retrieval": 1}
    manifest = write_demo_dataset(tmp_path, 10, seed=0, weights=weights, videos=False, warmup=4)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    tasks = [r["source"].removeprefix("demo-") for r in records]
    assert tasks[:4] == [WARMUP_TASK] * 4
    assert sorted(tasks[4:7]) == sorted(tasks[7:10]) == sorted(weights)
    pipe = load_pipeline("tiny")
    firsts = [r["messages"][0]["content"] for r in records]
    for in_order in (True, False):
        stream = pack_stream(manifest, pipe.tokenizer, pipe.special, MediaConfig.for_model(pipe.model.config),
                             seq_len=64, reset=True, in_order=in_order)
        seen = [stream.mixture.next().messages[0]["content"] for _ in range(10)]
        assert (seen == firsts) == in_order
    # a shorter set is the longer one's beginning (the recipe's first steps need only that)
    short = write_demo_dataset(tmp_path / "short", 6, seed=0, weights=weights, videos=False, warmup=4)
    assert manifest.read_text().splitlines()[:6] == short.read_text().splitlines()
    assert _digest(tmp_path / "short" / "media") == _digest_of(tmp_path / "media", short)


def test_retrieval_is_the_niah_text_needle():
    """The demo's retrieval task asks LongVA's needle exactly as `eval niah --mode text`
    builds it, so the NIAH grid on the demo model measures retrieval, not format."""
    import random
    import re

    from longvita.eval.niah.needles import make_text_needles

    needle = make_text_needles(1, seed=5)[0]
    pattern = re.compile(r"The special magic (\w+) number is: (\d{7})\.")
    assert pattern.fullmatch(needle.sentence)
    rng = random.Random(0)
    for _ in range(60):  # held-out: LongVA's task, one needle, asked as the NIAH cell asks it
        ex = make_example(rng, "retrieval")
        found = dict(pattern.findall(ex.question))
        city = re.search(r"(?:magic (\w+) number\?|magic (\w+) number\.|number for (\w+)\?)", ex.question.rsplit("\n", 1)[1])
        asked = next(g for g in city.groups() if g)
        assert list(found) == [asked] and found[asked] == ex.answer and not ex.followups
    two = 0
    for _ in range(60):  # training: a third hold a second city's needle, every needle asked once
        ex = make_example(rng, "retrieval", train=True)
        found = dict(pattern.findall(ex.question))
        asked = [ex.answer] + [a for _, a in ex.followups]
        assert sorted(asked) == sorted(found.values()) and 1 <= len(asked) <= 2
        two += len(asked) == 2
    assert 8 <= two <= 35


def test_longest_retrieval_samples_fit_the_pack_whole():
    """The longest haystack (the length draw at its top) with every needle asked and the
    longer question form still fits the recipe's 1,024-token pack: a truncated sample
    would train on a cut conversation (the warning `longvita train` gives)."""
    import random

    from longvita.runtime.train.recipe import DEMO_SEQ_LEN
    from longvita.data import SpecialTokens, build_default_tokenizer
    from longvita.data.template import build_conversation

    class Longest:  # a Random whose length draw is at its top and whose suffix is always added
        def __init__(self, seed):
            self.rng, self.calls = random.Random(seed), 0

        def __getattr__(self, name):  # choice, sample, randrange: the real draws
            return getattr(self.rng, name)

        def random(self):
            self.calls += 1
            return 1 - 1e-12 if self.calls == 1 else (self.rng.random() if self.calls == 2 else 0.0)

    tok = build_default_tokenizer()
    special = SpecialTokens.from_tokenizer(tok)
    needles = set()
    for seed in range(40):
        ex = make_example(Longest(seed), "retrieval", train=True)
        turns = [("user", [ex.question]), ("assistant", [ex.answer])]
        for q, a in ex.followups:
            turns += [("user", [q]), ("assistant", [a])]
        n = len(build_conversation(tok, special, turns, tokens_per_tile=1).input_ids)
        needles.add(1 + len(ex.followups))
        assert 700 < n <= DEMO_SEQ_LEN, (seed, n)
    assert needles == {1, 2}


@pytest.mark.parametrize("task", TASKS)
def test_examples_have_checkable_answers(task):
    import random

    rng = random.Random(0)
    for _ in range(20):
        ex = make_example(rng, task)
        assert ex.answer and ex.answer == ex.answer.strip()
        if task == "count":
            assert ex.answer in {"1", "2", "3", "4"}
        if task == "which":
            assert ex.answer in {"first", "second", "third"} and len(ex.images) in (2, 3)
        if task == "frame":
            assert len(ex.frames) == 4
            odd = int(ex.answer) - 1
            same = [i for i in range(4) if i != odd]
            px = [torch.from_numpy(__import__("numpy").array(f)).flatten() for f in ex.frames]
            assert all(torch.equal(px[same[0]], px[i]) for i in same) and not torch.equal(px[odd], px[same[0]])
        if task == "retrieval":
            assert f"number is: {ex.answer}." in ex.question and len(ex.answer) == 7
        if task == "repeat":
            assert ex.question.endswith(": " + ex.answer) and 3 <= len(ex.answer) <= 20


@pytest.mark.parametrize("task", ["colour", "shape", "count", "which"])
def test_training_follow_ups_ask_about_the_same_media_without_giving_answers_away(task):
    """Training conversations ask more about the same picture(s) (every answer is right
    for the media drawn) and never ask what an earlier turn already said."""
    import random
    import re

    from longvita.data.demo import COLOURS, ORDINALS, SHAPES

    rng = random.Random(11)
    asked = 0
    for _ in range(80):
        ex = make_example(rng, task, train=True)
        said = set(re.findall(r"\w+", (ex.question + " " + ex.answer).lower()))
        for question, answer in ex.followups:
            assert answer.lower() not in said and answer.lower() + "s" not in said, (ex.question, ex.followups)
            said |= set(re.findall(r"\w+", (question + " " + answer).lower()))
            assert answer in COLOURS or answer in SHAPES or answer.isdigit(), answer
            if task == "which":  # the image the follow-up names is really that colour / shape
                nth = next(i for i, o in enumerate(ORDINALS) if f" {o} " in question)
                img = ex.images[nth]
                if answer in COLOURS:
                    px = torch.from_numpy(__import__("numpy").asarray(img).copy()).view(-1, 3).float()
                    dist = (px - torch.tensor(COLOURS[answer], dtype=torch.float32)).abs().sum(1)
                    assert int((dist < 10).sum()) > 200  # the shape's colour covers part of the picture
            asked += 1
        held = make_example(random.Random(rng.random()), task)
        assert not held.followups  # held-out examples ask one question
    assert asked >= 40


def test_held_out_examples_are_not_the_training_draw(tmp_path):
    manifest = write_demo_dataset(tmp_path, 40, seed=0, videos=False, warmup=0)
    train = {json.loads(line)["messages"][0]["content"].split("\n", 1)[-1] for line in manifest.read_text().splitlines()
             if "retrieval" in line}
    held = {ex.question for ex in demo_examples(5, 0, ("retrieval",))}
    assert not train & held


def test_demo_starts_from_a_scratch_initialisation():
    """Training from scratch starts from small weights (N(0, 0.02)), not PyTorch's N(0, 1)
    embeddings, and residual outputs are scaled down by depth."""
    from longvita.pipeline import untrained_model

    model = untrained_model("demo", 268, seed=0)
    layers = len(model.text.layers)
    assert model.text.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.text.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.text.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / (2 * layers) ** 0.5, rel=0.05)
    assert model.vision.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biases and all(not b.any() for b in biases)
    again = untrained_model("demo", 268, seed=0)
    assert torch.equal(model.text.embed_tokens.weight, again.text.embed_tokens.weight)


def test_demo_recipe_defaults_to_its_full_length():
    from longvita.cli import build_parser
    from longvita.cli.train import DEFAULT_STEPS, TrainOptions
    from longvita.runtime.train.recipe import DEMO_STEPS

    args = build_parser().parse_args(["train", "--recipe", "demo", "--out", "/nonexistent/demo-run"])
    assert TrainOptions.from_args(args).steps == DEMO_STEPS
    args = build_parser().parse_args(["train", "--out", "/nonexistent/run"])
    assert TrainOptions.from_args(args).steps == DEFAULT_STEPS


def test_eval_demo_cli_runs(capsys):
    assert main(["eval", "demo", "--model", "tiny", "--n", "1", "--tasks", "colour,retrieval", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["accuracy"]) == {"colour", "retrieval"} and out["n_per_task"] == 1


def test_eval_demo_bad_task_one_line(capsys):
    assert main(["eval", "demo", "--model", "tiny", "--tasks", "colour,nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tasks" in err[0]


def test_demo_recipe_trains_from_scratch(tmp_path, monkeypatch, capsys):
    from longvita.runtime.train import recipe as recipes

    monkeypatch.setattr(recipes, "DEMO_SAMPLES", 48)
    assert main(["train", "--recipe", "demo", "--steps", "2", "--out", str(tmp_path), "--json"]) == 0
    losses = [json.loads(line)["loss"] for line in capsys.readouterr().out.strip().splitlines()]
    assert len(losses) == 2 and all(l == l and l < 10 for l in losses)
    pipe = load_pipeline(str(tmp_path / "final"))
    assert pipe.model.config.vision.image_size == 112 and pipe.model.config.text.hidden_size == 256


# ----------------------------------------------------------------------------------
# The shipped weights
# ----------------------------------------------------------------------------------


def test_the_installed_package_ships_the_repositorys_demo():
    """The weights tests skip when no demo ships; an install (wheel, `pip install .`) from a
    checkout that has them must carry them (package data), or those tests would pass by
    skipping."""
    repo_demo = Path(__file__).resolve().parents[1] / "longvita" / "assets" / "demo"
    if not (repo_demo / "model.safetensors").is_file():
        pytest.skip("this checkout has no trained demo model")
    assert embedded_demo_available(), f"installed longvita at {EMBEDDED_DEMO.parent.parent} lacks assets/demo"
    assert (EMBEDDED_DEMO / "model.safetensors").read_bytes() == (repo_demo / "model.safetensors").read_bytes()


@needs_demo
def test_shipped_weights_are_small_and_load():
    size = (EMBEDDED_DEMO / "model.safetensors").stat().st_size
    assert size <= 16 * 2**20
    pipe = load_pipeline(None)
    assert pipe.source == DEMO_SOURCE and pipe.dtype == torch.float32


@needs_demo
def test_shipped_weights_accuracy_on_held_out_examples():
    """The issue's tasks on a small fixed held-out draw (never the training draw): the
    shipped model answers them as its recorded accuracy says (a seconds-long check)."""
    from longvita.eval.demo import evaluate_demo

    pipe = load_pipeline(None)
    result = evaluate_demo(pipe, n_per_task=8, seed=7, tasks=("colour", "shape", "count", "text", "retrieval"))
    acc = {t: r["accuracy"] for t, r in result.items()}
    # 8 examples a task: targets are 95 % (colour, shape, count) and 90 % (text, retrieval);
    # one miss in 8 is what a model at the target can show
    assert all(a >= 7 / 8 for a in acc.values()), acc
    recorded = json.loads((EMBEDDED_DEMO / "train_log.json").read_text())["held_out"]["accuracy"]
    assert all(recorded[t] >= (0.95 if t in ("colour", "shape", "count") else 0.9) for t in acc), recorded


@needs_demo
@pytest.mark.parametrize("seed", [0, 1])
def test_default_generate_gives_the_right_answer(capsys, seed):
    assert main(["generate", "--seed", str(seed), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["text"].strip() == demo_picture(seed)[1] and out["model"] == DEMO_SOURCE


@needs_demo
def test_default_generate_says_what_it_asked(capsys):
    """Without --json the user sees the question and what the picture shows (stderr) and
    the answer (stdout), so the main command's output can be checked by eye."""
    assert main(["generate"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == demo_picture(0)[1]
    first = captured.err.strip().splitlines()[0]
    assert "What colour is the shape?" in first and f"picture of a {demo_picture(0)[1]} " in first


@needs_demo
def test_recipe_reproduces_the_recorded_first_losses(tmp_path, monkeypatch, capsys):
    """`longvita train --recipe demo` from the same seed: its first 20 losses are those of
    the run that produced the shipped weights (train_log.json beside them). The generated
    set is read in order and its first samples do not depend on its size, so writing the
    first 1,000 (the 20 steps use ~350) gives the recorded run's packs in a second."""
    from longvita.runtime.train import recipe as recipes

    log = json.loads((EMBEDDED_DEMO / "train_log.json").read_text())
    monkeypatch.setattr(recipes, "DEMO_SAMPLES", 1000)
    assert main(["train", "--recipe", "demo", "--steps", "20", "--seed", str(log["seed"]), "--out", str(tmp_path), "--json"]) == 0
    losses = [json.loads(line)["loss"] for line in capsys.readouterr().out.strip().splitlines()]
    # the first 20 steps do not depend on the run's length: 100 warm-up steps, same packs
    assert losses == pytest.approx(log["first_losses"][:20], rel=2e-2, abs=2e-2)
