"""Training data: manifest, labels, packing, truncation, skips, mixtures, synthetic set."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from longvita.data import InputError, SpecialTokens, build_default_tokenizer, build_inputs, load_image, tile_image
from longvita.data.synthetic import write_synthetic_dataset
from longvita.data.template import build_conversation
from longvita.data.packing import Mixture, PackStream, pack_samples, stage_ratios
from longvita.data.training import (
    IGNORE_INDEX,
    DataWarning,
    MediaConfig,
    Sample,
    read_manifest,
    tokenize_sample,
    truncate,
)

TINY = MediaConfig(tokens_per_tile=4, image_size=56, max_num=6)


@pytest.fixture(scope="module")
def tok():
    return build_default_tokenizer()


@pytest.fixture(scope="module")
def special(tok):
    return SpecialTokens.from_tokenizer(tok)


def _text(msgs):
    return [{"role": r, "content": c} for r, c in msgs]


def _expected(tok, special, msgs):
    """Hand-built ids and unshifted targets: the default tokenizer has one token per byte."""
    ids, target = [], []

    def put(tokens, t):
        ids.extend(tokens)
        target.extend([t] * len(tokens))

    for role, content in msgs:
        put([special.im_start] + list(f"{role}\n".encode()), False)
        put(list(content.encode()), role == "assistant")
        put([special.im_end], role == "assistant")
        put(list(b"\n"), False)
    return ids, target


def _shift(ids, target):
    return [ids[i + 1] if i + 1 < len(ids) and target[i + 1] else IGNORE_INDEX for i in range(len(ids))]


CONV_A = [("system", "be brief"), ("user", "hi"), ("assistant", "ok"), ("user", "2+2?"), ("assistant", "4")]
CONV_B = [("user", "colour?"), ("assistant", "red")]


@pytest.mark.parametrize("reset", [True, False])
def test_packed_labels_match_hand_built(tok, special, reset):
    samples = [tokenize_sample(Sample(_text(c), source=s), tok, special, TINY) for c, s in ((CONV_A, "a"), (CONV_B, "b"))]
    exp_ids, exp_labels, lengths = [], [], []
    for conv in (CONV_A, CONV_B):
        ids, target = _expected(tok, special, conv)
        exp_ids += ids
        exp_labels += _shift(ids, target)  # shifted within each sample: no pair across the boundary
        lengths.append(len(ids))
    seq_len = sum(lengths) + 5
    pack = pack_samples(samples, seq_len, reset=reset, pad_id=special.endoftext)
    assert pack.input_ids.tolist() == exp_ids + [special.endoftext] * 5
    assert pack.labels.tolist() == exp_labels + [IGNORE_INDEX] * 5
    # the last row of each sample is ignored; the row before "red" predicts "r"
    assert pack.labels[lengths[0] - 1] == IGNORE_INDEX
    assert pack.num_valid == len(b"ok") + 1 + len(b"4") + 1 + len(b"red") + 1
    assert pack.sources == ["a", "b"]
    if reset:
        assert pack.cu_seqlens.tolist() == [0, lengths[0], sum(lengths), seq_len]
        assert pack.position_ids.tolist() == list(range(lengths[0])) + list(range(lengths[1])) + list(range(5))
        assert pack.max_seqlen == max(lengths + [5])
    else:
        assert pack.cu_seqlens.tolist() == [0, seq_len]
        assert pack.position_ids.tolist() == list(range(seq_len))
        assert pack.max_seqlen == seq_len
    assert pack.cu_seqlens.dtype == torch.int32
    # decoded targets are exactly the assistant replies and their <|im_end|>
    targets = pack.labels[pack.labels != IGNORE_INDEX].tolist()
    assert tok.decode(targets, skip_special_tokens=False) == "ok<|im_end|>4<|im_end|>red<|im_end|>"


def test_conversation_user_turn_matches_build_inputs(tok, special, tmp_path):
    from PIL import Image

    Image.new("RGB", (112, 56), (200, 10, 10)).save(tmp_path / "a.png")
    tiles = tile_image(load_image(tmp_path / "a.png", image_size=56), image_size=56, max_num=6)
    prompt = build_inputs(tok, special, [tiles, "\nwhat?"], tokens_per_tile=4, system="sys")
    conv = build_conversation(tok, special, [("system", ["sys"]), ("user", [tiles, "\nwhat?"]), ("assistant", ["x"])],
                              tokens_per_tile=4)
    n = prompt.input_ids.numel()
    assert conv.input_ids[:n].tolist() == prompt.input_ids.tolist()
    assert torch.equal(conv.pixel_values, prompt.pixel_values)
    assert not conv.target_mask[:n].any() and conv.target_mask[n:].tolist() == [True, True, False]
    (span,) = conv.media
    assert conv.input_ids[span.start] == special.img_start and conv.input_ids[span.end - 1] == special.patch_end
    assert (span.tile_start, span.tile_end) == (0, 3)


def _manifest(tmp_path, lines, name="m.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_manifest_errors_name_file_and_line(tmp_path):
    good = {"messages": _text(CONV_B)}
    for bad, words in [
        ("{not json", "not valid JSON"),
        ({"messages": []}, "messages"),
        ({"messages": _text([("user", "hi")])}, "no assistant"),
        ({"messages": _text([("robot", "hi"), ("assistant", "x")])}, "robot"),
        ({"messages": _text([("user", "<image> <image>"), ("assistant", "x")]), "images": ["a.png"]}, "placeholders"),
        ({"messages": _text(CONV_B), "images": [3]}, "images"),
        ({"messages": _text([("system", "s"), ("assistant", "x")]), "images": ["a.png"]}, "no user message"),
    ]:
        path = _manifest(tmp_path, [good, bad])
        with pytest.raises(InputError, match=rf"m\.jsonl.*line 2.*{words}"):
            read_manifest(path)
    samples = read_manifest(_manifest(tmp_path, [good, "", {**good, "source": "x", "images": ["i.png"]}]))
    assert [s.source for s in samples] == ["m", "x"]
    assert samples[1].images == [tmp_path / "i.png"] and samples[1].name.endswith("m.jsonl:3")


def test_media_without_placeholder_go_first(tok, special, tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 56), (0, 0, 255)).save(tmp_path / "b.png")
    path = _manifest(tmp_path, [{"images": ["b.png"], "messages": _text([("user", "q"), ("assistant", "a")])}])
    s = tokenize_sample(read_manifest(path)[0], tok, special, TINY)
    text = tok.decode(s.input_ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nq<|im_end|>")
    assert s.pixel_values.shape == (1, 3, 56, 56)


def test_truncation_warns_and_keeps_media_whole(tok, special, tmp_path):
    from PIL import Image

    Image.new("RGB", (112, 56), (0, 200, 0)).save(tmp_path / "c.png")
    msgs = _text([("user", "look " * 6 + "<image>\nname it"), ("assistant", "green " * 10)])
    s = tokenize_sample(Sample(msgs, images=[tmp_path / "c.png"], name="m.jsonl:7"), tok, special, TINY)
    (span,) = s.media
    with pytest.warns(DataWarning, match="m.jsonl:7.*truncated to"):
        t = truncate(s, span.start + 3)  # the cut would fall inside the image: cut before it
    assert len(t) == span.start and t.pixel_values is None and t.media == []
    with pytest.warns(DataWarning, match="truncated"):
        t = truncate(s, len(s) - 4)  # cut inside the answer: image kept whole
    assert len(t) == len(s) - 4 and t.pixel_values.shape[0] == 3 and t.labels[-1] == IGNORE_INDEX
    assert t.labels[:-1].tolist() == s.labels[: len(t) - 1].tolist()
    # through the stream: the long sample is truncated to the pack, still trained on
    mix = Mixture({"m": [Sample(msgs, images=[tmp_path / "c.png"], name="long")]}, seed=0)
    with pytest.warns(DataWarning, match="'long'.*truncated"):
        pack = PackStream(mix, tok, len(s) - 4, TINY).next_pack()
    assert pack.input_ids.numel() == len(s) - 4 and pack.num_valid > 0 and pack.pixel_values.shape[0] == 3


def test_missing_and_corrupt_media_are_skipped(tok, special, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    from PIL import Image

    Image.new("RGB", (56, 56), (9, 9, 9)).save(tmp_path / "ok.png")
    q = _text([("user", "<image>what?"), ("assistant", "dark")])
    path = _manifest(tmp_path, [
        {"images": ["ok.png"], "messages": q},
        {"images": ["missing.png"], "messages": q},
        {"videos": ["missing.mp4"], "messages": _text([("user", "<video>go?"), ("assistant", "yes")])},
        {"images": ["bad.png"], "messages": q},
        {"messages": _text(CONV_B)},
    ])
    samples = read_manifest(path)
    seq_len = sum(len(tokenize_sample(samples[i], tok, special, TINY)) for i in (0, 4))  # exactly one epoch
    mix = Mixture({"m": samples}, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pack = PackStream(mix, tok, seq_len, TINY).next_pack()
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 3 and all("skipping sample" in m for m in messages)
    assert any("missing.png" in m for m in messages) and any("bad.png" in m for m in messages)
    assert len(pack.skipped_media) == 3 and "missing.png" in pack.skipped_media[0]
    assert "missing.mp4" in pack.skipped_media[1] and "bad.png" in pack.skipped_media[2]
    assert pack.names == [f"{path}:1", f"{path}:5"] and pack.pixel_values.shape[0] == 1


def _corpus(n, source):
    return [Sample(_text([("user", f"{source} q{i}"), ("assistant", f"a{i}" * (1 + i % 3))]), source=source,
                   name=f"{source}:{i}") for i in range(n)]


def test_mixture_ratios_and_determinism():
    sources = {"stage2": _corpus(40, "stage2"), "stage3": _corpus(10, "stage3")}
    ratios = stage_ratios(["stage3"], ["stage2"], keep=0.1)
    assert ratios == {"stage2": 0.1, "stage3": 1.0}
    order = Mixture(sources, ratios, seed=3).epoch_order(0)
    assert sum(1 for s, _ in order if s == "stage2") == 4 and sum(1 for s, _ in order if s == "stage3") == 10
    assert len({i for s, i in order if s == "stage3"}) == 10  # every stage-3 sample once
    assert order == Mixture(sources, ratios, seed=3).epoch_order(0)
    assert order != Mixture(sources, ratios, seed=4).epoch_order(0)
    assert Mixture(sources, ratios, seed=3).epoch_order(1) != order
    up = Mixture(sources, {"stage3": 2.5, "stage2": 0}, seed=0).epoch_order(0)
    assert len(up) == 25 and {s for s, _ in up} == {"stage3"}
    with pytest.raises(ValueError, match="unknown"):
        Mixture(sources, {"nope": 1.0})


@pytest.mark.parametrize("reset", [True, False])
def test_resume_continues_with_the_same_packs(tok, reset):
    def stream():
        mix = Mixture({"x": _corpus(7, "x"), "y": _corpus(5, "y")}, {"y": 0.6}, seed=11)
        return PackStream(mix, tok, 96, TINY, reset=reset)

    full = stream()
    ref = [full.next_pack() for _ in range(4)]
    first = stream()
    head = [first.next_pack() for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))  # the state survives a checkpoint as plain data
    resumed = stream()
    resumed.load_state_dict(state)
    got = head + [resumed.next_pack() for _ in range(2)]
    for a, b in zip(ref, got):
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
        assert (a.names, a.max_seqlen, a.num_valid) == (b.names, b.max_seqlen, b.num_valid)
    assert ref[0].names != ref[1].names


def test_mixture_from_manifests(tmp_path):
    a = _manifest(tmp_path, [{"messages": _text(CONV_B), "source": "ignored"}] * 3, "a.jsonl")
    b = _manifest(tmp_path, [{"messages": _text(CONV_A)}] * 2, "b.jsonl")
    mix = Mixture.from_manifests({"old": [a, b], "new": b}, {"old": 0.2}, seed=1)
    assert {k: len(v) for k, v in mix.sources.items()} == {"old": 5, "new": 2}
    assert {s.source for s in mix.sources["old"]} == {"old"}
    assert len(mix.epoch_order(0)) == 1 + 2
    grouped = Mixture.from_samples(read_manifest(a) + read_manifest(b))
    assert sorted(grouped.sources) == ["b", "ignored"]


@pytest.mark.parametrize("preprocess", ["long-vita", "internvl"])
def test_synthetic_dataset_loads_and_packs(tok, tmp_path, preprocess):
    manifest = write_synthetic_dataset(tmp_path / "syn", n_samples=12, seed=5)
    again = write_synthetic_dataset(tmp_path / "syn2", n_samples=12, seed=5)
    assert manifest.read_text() == again.read_text()
    samples = read_manifest(manifest)
    assert len(samples) == 12 and {s.source for s in samples} <= {"synthetic-images", "synthetic-videos", "synthetic-text"}
    try:
        import av  # noqa: F401
        assert any(s.videos for s in samples)
    except ImportError:
        assert not any(s.videos for s in samples)
    mix = Mixture({"syn": samples}, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # nothing skipped or truncated
        media = MediaConfig(tokens_per_tile=4, image_size=56, max_num=6, preprocess=preprocess)
        stream = PackStream(mix, tok, 384, media)
        packs = [stream.next_pack() for _ in range(3)]
    for pack in packs:
        assert pack.input_ids.shape == (384,) and pack.num_valid > 0 and not pack.skipped_media
        n_context = sum(int((pack.input_ids == t).sum()) for t in SpecialTokens.from_tokenizer(tok).context_token_ids)
        n_tiles = 0 if pack.pixel_values is None else pack.pixel_values.shape[0]
        assert n_context == 4 * n_tiles  # every context token has its tile
        answers = tok.decode(pack.labels[pack.labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)
        assert answers.endswith("<|im_end|>")
