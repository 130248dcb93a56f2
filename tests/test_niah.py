"""Needle-in-a-haystack evaluation (longvita.eval): placement, teacher-forced scoring,
the feature cache, context parallelism, the table, the heatmap and the CLI's errors."""

from __future__ import annotations

import json
import types

import pytest
import torch
from PIL import Image

from _dist import run_on_ranks
from longvita.cli import main
from longvita.eval.niah import haystack as niah_haystack
from longvita.eval.niah import run as niah_run
from longvita.eval.niah.needles import make_text_needles, make_visual_needles
from longvita.eval.niah import (
    CellInputs, NiahGrid, TextHaystack, VideoHaystack, draw_heatmap, read_results, run_niah, score_cell, text_cell,
    visual_cell,
)
from longvita.model import LongVITA
from longvita.pipeline import load_pipeline

from _model import logits as full_logits


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    """The kernels have their own tests; here Triton's interpreter would only be slow
    (spawned ranks inherit the setting)."""
    monkeypatch.setenv("LONGVITA_BACKEND", "torch")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny", seed=3)


def _enc(pipe, text):
    return pipe.tokenizer.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, 50, 100])
def test_text_needle_sits_at_its_depth(pipe, depth):
    hay = TextHaystack(pipe.tokenizer, None, seed=1, min_tokens=600)
    needle = make_text_needles(1, seed=4)[0]
    cell = text_cell(pipe.tokenizer, pipe.special, hay, needle, depth, 500)
    ids = cell.input_ids
    assert ids.numel() == 500
    start, end = cell.needle_span
    assert ids[start:end].tolist() == _enc(pipe, " " + needle.sentence + " ")
    prefix = len(_enc(pipe, "<|im_start|>user\n"))
    n_hay = cell.answer_positions[0].item() - prefix - (end - start) - len(
        _enc(pipe, "\n" + needle.question + " Answer with the number only.<|im_end|>\n<|im_start|>assistant\n"))
    assert start - prefix == round(depth / 100 * n_hay)
    assert ids[prefix:start].tolist() == hay.ids[: start - prefix].tolist()  # haystack before, in order
    answer = ids.index_select(0, cell.answer_positions).tolist()
    assert answer == _enc(pipe, needle.answer) and ids[-1].item() == pipe.special.im_end


def test_text_distractors_leave_the_needle_intact(pipe):
    hay = TextHaystack(pipe.tokenizer, None, seed=1, min_tokens=1500)
    needle = make_text_needles(1, seed=4)[0]
    cell = text_cell(pipe.tokenizer, pipe.special, hay, needle, 50, 1200, n_distractors=3, seed=2)
    text = pipe.tokenizer.decode(cell.input_ids.tolist())
    assert text.count("The special magic") == 4 and needle.sentence in text
    start, end = cell.needle_span
    assert cell.input_ids[start:end].tolist() == _enc(pipe, " " + needle.sentence + " ")


@pytest.mark.parametrize("depth,frame", [(0, 0), (50, 4), (100, 8)])
def test_visual_needle_replaces_the_frame_at_its_depth(pipe, depth, frame):
    cfg = pipe.model.config
    needle = make_visual_needles(1, size=cfg.vision.image_size)[0]
    cell = visual_cell(pipe.tokenizer, pipe.special, cfg, needle, depth, 9, "long-vita")
    assert cell.frame_sources == [-1 if f == frame else f for f in range(9)]
    media = torch.isin(cell.input_ids, torch.tensor(pipe.special.context_token_ids))
    n = cfg.tokens_per_tile
    assert int(media.sum()) == 9 * n
    slots = media.nonzero().squeeze(1)
    assert cell.needle_span == (int(slots[frame * n]), int(slots[frame * n + n - 1]) + 1)
    assert cell.input_ids.index_select(0, cell.answer_positions).tolist() == _enc(pipe, needle.answer)


# ----------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------


class _Rigged(torch.nn.Module):
    """The LongVITA surface score_cell uses, with an LM head rigged to ``truth``
    (position -> token): the row at position p puts logit 12 on ``truth[p + 1]``."""

    def __init__(self, config, truth: dict[int, int], vocab: int):
        super().__init__()
        self.config, self.truth, self.vocab = config, truth, vocab
        self.text = types.SimpleNamespace(embed_tokens=torch.nn.Embedding(vocab, 4))
        self.w = torch.nn.Parameter(torch.zeros(1))

    place_media = staticmethod(LongVITA.place_media)
    media_mask = LongVITA.media_mask

    def forward(self, inputs_embeds, position_ids, attention=None):
        return position_ids[:, None].float()  # the "hidden state" of a row is its position

    def logits(self, hidden, index):
        pos = hidden.index_select(0, index)[:, 0].long()
        logits = torch.zeros(pos.numel(), self.vocab)
        for i, p in enumerate(pos.tolist()):
            logits[i, self.truth.get(p + 1, 0)] = 12.0
        return logits


def _text_cell(pipe, context=300, depth=50):
    hay = TextHaystack(pipe.tokenizer, None, seed=1, min_tokens=context)
    needle = make_text_needles(1, seed=4)[0]
    return text_cell(pipe.tokenizer, pipe.special, hay, needle, depth, context)


def test_rigged_head_scores_right_and_a_shuffled_answer_wrong(pipe):
    cell = _text_cell(pipe)
    vocab = pipe.model.config.text.vocab_size
    truth = {int(p): int(cell.input_ids[p]) for p in cell.answer_positions}
    res = score_cell(_Rigged(pipe.model.config, truth, vocab), cell)
    assert res["correct"] and res["predicted"] == [truth[int(p)] for p in cell.answer_positions]
    import math
    assert res["logprob"] == pytest.approx(-math.log1p((vocab - 1) * math.exp(-12.0)), rel=2e-3)  # fp32 log-softmax
    # the same cell scored against a shuffled answer: the rig still says the true one
    ids = cell.input_ids.clone()
    ans = ids.index_select(0, cell.answer_positions)
    ids[cell.answer_positions] = ans.roll(1) if ans.unique().numel() > 1 else (ans + 1)
    if torch.equal(ids[cell.answer_positions], ans):
        ids[cell.answer_positions[0]] += 1
    wrong = CellInputs(ids, cell.answer_positions, cell.needle_span)
    res = score_cell(_Rigged(pipe.model.config, truth, vocab), wrong)
    assert not res["correct"] and res["logprob"] < -5


def test_score_matches_all_logits_reference(pipe):
    """The teacher-forced score equals argmax / log-softmax over the full forward's logits."""
    cell = _text_cell(pipe, 260, 25)
    model = pipe.model
    res = score_cell(model, cell)
    with torch.no_grad():
        logits = full_logits(model, cell.input_ids).double()
    rows = cell.answer_positions - 1
    targets = cell.input_ids.index_select(0, cell.answer_positions)
    logp = torch.log_softmax(logits[rows], -1).gather(1, targets[:, None]).mean().item()
    assert res["predicted"] == logits[rows].argmax(-1).tolist()
    assert abs(res["logprob"] - logp) < 1e-4
    assert res["correct"] == bool((logits[rows].argmax(-1) == targets).all())


def test_cached_features_score_like_recomputed_pixels(pipe, tmp_path):
    """Cached haystack features placed by ordinal == the model embedding the same frames
    (needle included) from pixels; a second run reads the cache and gives the same table."""
    model, cfg = pipe.model, pipe.model.config
    size = cfg.vision.image_size
    grid = NiahGrid("visual", [5], [25])
    needles = make_visual_needles(1, seed=2, size=size)
    rows = run_niah(pipe, grid, needles, tmp_path, show_progress=False)
    cache = list((tmp_path / "cache").glob("frames-*.safetensors"))
    assert len(cache) == 1
    encoded = []
    real = niah_run.frame_features
    counting = lambda m, tiles, *a, **k: encoded.append(tiles.shape[0]) or real(m, tiles, *a, **k)  # noqa: E731
    niah_run.frame_features = niah_haystack.frame_features = counting  # the needle's and the haystack's
    try:
        again = run_niah(pipe, grid, needles, tmp_path, show_progress=False)
    finally:
        niah_run.frame_features = niah_haystack.frame_features = real
    assert encoded == [1]  # the needle only: the haystack's 5 frames came from the cache
    assert [r["logprob"] for r in again] == [r["logprob"] for r in rows]

    # reference: the full forward from pixels, the needle tile in its frame's place
    from longvita.data.video import frame_tile
    hay = VideoHaystack(None, 5, size, "long-vita")
    cell = visual_cell(pipe.tokenizer, pipe.special, cfg, needles[0], 25, 5, "long-vita")
    tiles = hay.tiles.clone()
    tiles[cell.frame_sources.index(-1)] = frame_tile(needles[0].image, size, "long-vita", raw=True)
    with torch.no_grad():
        logits = full_logits(model, cell.input_ids, tiles).double()
    targets = cell.input_ids.index_select(0, cell.answer_positions)
    logp = torch.log_softmax(logits[cell.answer_positions - 1], -1).gather(1, targets[:, None]).mean().item()
    assert abs(rows[0]["logprob"] - logp) < 1e-4


def _grid_on_ranks(rank, world, out, mode):
    torch.manual_seed(0)
    p = load_pipeline("tiny", seed=3)
    if mode == "text":
        grid, needles = NiahGrid("text", [150, 301], [0, 60]), make_text_needles(2, seed=1)
    else:
        grid, needles = NiahGrid("visual", [3, 6], [0, 100]), make_visual_needles(2, seed=1, size=p.model.config.vision.image_size)
    return run_niah(p, grid, needles, f"{out}-{world}", show_progress=False)


@pytest.mark.parametrize("mode", ["text", "visual"])
def test_one_and_two_ranks_give_the_same_table(tmp_path, mode):
    one = _grid_on_ranks(0, 1, str(tmp_path / "t"), mode)
    two = run_on_ranks(_grid_on_ranks, 2, tmp_path, str(tmp_path / "t"), mode)
    assert two[0] == two[1]  # every rank returns the whole table
    assert {r["world_size"] for r in two[0]} == {2}
    assert len(one) == len(two[0]) == 8
    for a, b in zip(one, two[0]):
        assert (a["length"], a["depth"], a["needle"], a["correct"], a["predicted"]) == \
               (b["length"], b["depth"], b["needle"], b["correct"], b["predicted"])
        assert abs(a["logprob"] - b["logprob"]) < 1e-4
    assert len(read_results(tmp_path / "t-2")) == 8  # rank 0 wrote it


def test_same_seed_same_table_and_resume_skips_done_cells(pipe, tmp_path, monkeypatch):
    grid = NiahGrid("text", [200, 260], [0, 100])
    needles = make_text_needles(2, seed=5)
    a = run_niah(pipe, grid, needles, tmp_path / "a", show_progress=False)
    b = run_niah(pipe, grid, needles, tmp_path / "b", show_progress=False)
    assert a == b
    # an "interrupted" run: only the first length done, then resumed over the whole grid
    run_niah(pipe, NiahGrid("text", [200], [0, 100]), needles, tmp_path / "c", show_progress=False)
    calls = []
    real = niah_run.score_cell
    monkeypatch.setattr(niah_run, "score_cell", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = run_niah(pipe, grid, needles, tmp_path / "c", resume=True, show_progress=False)
    assert len(calls) == 4 and len(c) == 8
    assert sorted(json.dumps(r, sort_keys=True) for r in c) == sorted(json.dumps(r, sort_keys=True) for r in a)
    assert not list((tmp_path / "c").glob("*.tmp"))  # no half-written file left behind


def test_heatmap_is_a_png_with_the_grid_shape(tmp_path):
    rows = [{"mode": "text", "length": n, "depth": d, "correct": (n + int(d)) % 3 == 0}
            for n in (100, 200, 400) for d in (0.0, 50.0, 100.0, 25.0)]
    shape = draw_heatmap(rows, tmp_path / "h.png")
    assert shape == (4, 3)
    data = (tmp_path / "h.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "h.png") as img:
        img.verify()


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


def test_cli_default_runs_a_small_grid(tmp_path, capsys):
    assert main(["eval", "niah", "--out", str(tmp_path), "--frames", "2,4", "--depths", "0,100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["cells"] == 8 and set(out["by_length"]) == {"2", "4"}
    assert (tmp_path / "results.jsonl").exists() and (tmp_path / "results.csv").exists()
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_text_needles_file(tmp_path, capsys):
    f = tmp_path / "needles.jsonl"
    f.write_text(json.dumps({"id": "n1", "sentence": "The best fruit is a mango.", "question": "What is the best fruit?",
                             "answer": "mango"}) + "\n")
    assert main(["eval", "niah", "--mode", "text", "--needles", str(f), "--context", "120", "--depths", "50",
                 "--out", str(tmp_path / "o"), "--json"]) == 0
    rows = read_results(tmp_path / "o")
    assert [r["needle"] for r in rows] == ["n1"] and rows[0]["answer"] == "mango"


@pytest.mark.parametrize("argv,want", [
    (["--haystack", "/no/such/videos"], "--haystack"),
    (["--frames", "4,x"], "--frames"),
    (["--depths", "0,120"], "--depths"),
    (["--mode", "text", "--frames", "4"], "--frames"),
    (["--model", "/no/such/model"], "--model"),
])
def test_cli_bad_arguments_one_line(tmp_path, capsys, argv, want):
    assert main(["eval", "niah", "--out", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err


@pytest.mark.parametrize("content,want", [
    ("{not json\n", "not JSON"),
    (json.dumps({"id": "a", "question": "q?", "answer": "x"}) + "\n", "missing image"),
    ("\n", "holds no needles"),
])
def test_cli_malformed_needles_one_line(tmp_path, capsys, content, want):
    f = tmp_path / "needles.jsonl"
    f.write_text(content)
    assert main(["eval", "niah", "--needles", str(f), "--frames", "2", "--depths", "0", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--needles" in err[0] and want in err[0], err


def test_text_haystack_folder_and_missing(tmp_path, pipe):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.md").write_text("beta " * 50)
    hay = TextHaystack(pipe.tokenizer, tmp_path, seed=0)
    text = pipe.tokenizer.decode(hay.ids.tolist())
    assert text.startswith("alpha") and "beta" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no .txt or .md"):
        TextHaystack(pipe.tokenizer, tmp_path / "empty", seed=0)


def test_video_folder_haystack_reads_files_in_turn_and_keys_the_cache(tmp_path, pipe):
    """A folder of videos at 1 fps, read in name order until the grid has its frames; the
    feature cache's key changes with the files (a replaced video is re-encoded)."""
    pytest.importorskip("av")
    from _dist import write_mp4

    folder = tmp_path / "videos"
    folder.mkdir()
    write_mp4(folder / "a.mp4", n_frames=3, fps=1, seed=1)
    write_mp4(folder / "b.mp4", n_frames=4, fps=1, seed=2)
    size = pipe.model.config.vision.image_size
    hay = VideoHaystack(folder, 5, size, "long-vita")
    assert hay.tiles.shape == (5, 3, size, size) and hay.tiles.dtype == torch.uint8
    assert len(hay.key_parts) == 2  # 3 frames of a.mp4, then 2 of b.mp4
    key = hay.cache_key(pipe.model)
    write_mp4(folder / "b.mp4", n_frames=4, fps=1, seed=3, width=66)
    assert VideoHaystack(folder, 5, size, "long-vita").cache_key(pipe.model) != key
    with pytest.raises(Exception, match="gives 7 frames"):
        VideoHaystack(folder, 9, size, "long-vita")
    rows = run_niah(pipe, NiahGrid("visual", [4], [50]), make_visual_needles(1, size=size), tmp_path / "o",
                    haystack=str(folder), show_progress=False)
    assert len(rows) == 1 and rows[0]["frames"] == 4
