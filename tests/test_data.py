"""Inputs: image tiling against InternVL's algorithm, video frame selection, the in-code
tokenizer and the ChatML + media token layout."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken

from longvita.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTiles,
    InputError,
    SPECIAL_TOKENS,
    SpecialTokens,
    build_default_tokenizer,
    build_inputs,
    choose_grid,
    load_image,
    load_tokenizer,
    load_video,
    select_frames,
    tile_image,
    tokens_per_tile,
)
from longvita.data.image import to_tensor


# ---------------------------------------------------------------- InternVL reference
def internvl_grid(width, height, image_size, min_num, max_num, ties=None):
    """InternVL's dynamic_preprocess grid choice, written out independently of
    longvita.data.image. Returns (cols, rows); counts taken exact ties in ``ties``."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
                if ties is not None:
                    ties.append((width, height, ratio))
    return best_ratio


def normalised(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


def test_grid_matches_internvl_including_ties():
    rng = random.Random(torch.initial_seed())
    ties = []
    for image_size in (448, 56):
        # min_num > 1 makes equal-area grids tie (5:4 between 1x2 and 2x1 with min 2, max 3):
        # there the candidates' order decides, so those configurations are included
        for min_num, max_num in ((1, 12), (1, 6), (2, 12), (1, 1), (2, 3), (4, 4), (5, 7), (3, 3)):
            sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(300)]
            # exact-ratio sizes at several scales hit the tie rule (e.g. 2:1 ties 2x1 with 4x2)
            ratios = ((1, 1), (2, 1), (1, 2), (3, 2), (4, 3), (5, 4), (3, 1), (9, 4), (6, 5), (13, 12), (5, 2), (5, 8), (5, 3))
            for a, b in ratios:
                for scale in (7, 28, 56, 100, 224, 448, 600):
                    sizes.append((a * scale, b * scale))
            for w, h in sizes:
                cols, rows = internvl_grid(w, h, image_size, min_num, max_num, ties)
                assert choose_grid(w, h, image_size=image_size, min_num=min_num, max_num=max_num) == (rows, cols), (w, h)
    assert len(ties) > 20, "the comparison must exercise the tie-break"


def test_grid_tie_break_prefers_more_tiles_for_large_images():
    S = 448
    assert choose_grid(2 * S, S, image_size=S) == (1, 2)  # area 2S² is not > 0.5*S²*8
    assert choose_grid(4 * S, 2 * S, image_size=S) == (2, 4)  # 2:1 tie 2x1 vs 4x2, large image
    assert choose_grid(S, S, image_size=S) == (1, 1)
    assert choose_grid(2 * S, 2 * S, image_size=S) == (2, 2)  # 4S² > 2S², not > 4.5S²
    assert choose_grid(3 * S, 3 * S, image_size=S) == (3, 3)


def test_tiles_row_major_with_thumbnail_first():
    S = 28
    colours = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 255)}
    arr = np.zeros((2 * S, 2 * S, 3), np.uint8)
    for (r, c), rgb in colours.items():
        arr[r * S:(r + 1) * S, c * S:(c + 1) * S] = rgb
    img = Image.fromarray(arr)
    tiles = tile_image(img, image_size=S)
    assert tiles.grid == (2, 2) and tiles.has_thumbnail and tiles.num_tiles == 5
    assert tiles.pixel_values.dtype == torch.float32 and tiles.pixel_values.shape == (5, 3, S, S)
    # grid resize is the identity here, so grid tiles are exact solid colours, row-major
    for k, rgb in enumerate(colours.values()):
        expected = normalised(rgb).view(3, 1, 1).expand(3, S, S)
        torch.testing.assert_close(tiles.pixel_values[1 + k], expected, atol=1e-5, rtol=0)
    # the thumbnail comes first: the whole (square) image shrunk to one tile
    thumb = to_tensor(img.resize((S, S), Image.Resampling.BICUBIC))
    torch.testing.assert_close(tiles.pixel_values[0], thumb)


def test_grid_tiles_equal_internvl_crops():
    S = 32
    img = Image.fromarray(np.random.default_rng(torch.initial_seed()).integers(0, 256, (45, 170, 3), dtype=np.uint8))
    tiles = tile_image(img, image_size=S, max_num=8)
    rows, cols = tiles.grid
    cols_ref, rows_ref = internvl_grid(170, 45, S, 1, 8)
    assert (rows, cols) == (rows_ref, cols_ref) and rows * cols > 1
    resized = img.resize((S * cols, S * rows), Image.Resampling.BICUBIC)
    for i in range(rows * cols):
        box = ((i % cols) * S, (i // cols) * S, (i % cols + 1) * S, (i // cols + 1) * S)
        torch.testing.assert_close(tiles.pixel_values[1 + i], to_tensor(resized.crop(box)), atol=0, rtol=0)


def test_single_tile_is_padded_with_mean_colour():
    S = 40
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = (200, 100, 50)  # mean colour (100, 50, 25)
    tiles = tile_image(Image.fromarray(arr), image_size=S, max_num=1)
    assert tiles.grid == (1, 1) and not tiles.has_thumbnail and tiles.pixel_values.shape == (1, 3, S, S)
    mean = normalised((100, 50, 25)).view(3, 1)
    # padded canvas is 40x40 (resize is the identity): rows 0-9 and 30-39 are padding
    torch.testing.assert_close(tiles.pixel_values[0, :, 0, :], mean.expand(3, S), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiles.pixel_values[0, :, -1, :], mean.expand(3, S), atol=1e-5, rtol=0)
    torch.testing.assert_close(tiles.pixel_values[0, :, 20, 0], normalised((0, 0, 0)), atol=1e-5, rtol=0)


def test_image_tiles_validates_layout():
    with pytest.raises(ValueError, match="needs 7 tiles"):
        ImageTiles(torch.zeros(6, 3, 8, 8), (2, 3), True)
    with pytest.raises(ValueError, match=r"\(n_tiles, 3, S, S\)"):
        ImageTiles(torch.zeros(1, 3, 8, 9), (1, 1), False)


def test_load_image(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGBA", (7, 5), (1, 2, 3, 4)).save(good)
    img = load_image(good)
    assert img.mode == "RGB" and img.size == (7, 5) and img.getpixel((0, 0)) == (1, 2, 3)

    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match="nope.jpg.*does not exist"):
        load_image(missing)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all" * 10)
    with pytest.raises(InputError, match="garbage.png"):
        load_image(garbage)
    truncated = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:400])
    with pytest.raises(InputError, match="trunc.png.*corrupt"):
        load_image(truncated)
    with pytest.raises(ValueError, match="is not a file"):  # InputError is a ValueError
        load_image(tmp_path)


# ---------------------------------------------------------------- video
def test_select_frames_rule():
    ts30 = [i / 30 for i in range(300)]  # 10 s at 30 fps
    assert select_frames(ts30, max_fps=1.0) == list(range(0, 300, 30))
    assert select_frames(ts30, max_fps=2.0) == list(range(0, 300, 15))
    slow = [0, 2, 4, 6]  # 0.5 fps: slower than max_fps, keep everything
    assert select_frames(slow, max_fps=1.0) == [0, 1, 2, 3]
    irregular = [10.0, 10.4, 10.9, 11.05, 11.5, 13.2]  # relative to the first timestamp
    assert select_frames(irregular, max_fps=1.0) == [0, 3, 5]
    kept = select_frames(ts30, max_fps=1.0, max_frames=4)  # 10 candidates -> 4, ends kept
    assert kept == [0, 90, 180, 270]
    assert select_frames([], max_fps=1.0) == []
    with pytest.raises(ValueError, match="max_fps"):
        select_frames(ts30, max_fps=0)


def write_grey_video(path, codec):
    """3 s of 64x48 video at 8 fps; frame i is solid grey 10*i."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def grey_video(tmp_path_factory):
    return write_grey_video(tmp_path_factory.mktemp("video") / "grey.mp4", "mpeg4")


def grey_levels(frames):
    # undo the normalisation of the red channel and average: the frame's grey level
    return (frames[:, 0].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255


@pytest.mark.parametrize(
    "max_fps, max_frames, levels",
    [(1.0, 4096, [0, 80, 160]), (2.0, 4096, [0, 40, 80, 120, 160, 200]), (1.0, 2, [0, 160]), (100.0, 4096, None)],
)
def test_load_video_samples_frames(grey_video, max_fps, max_frames, levels):
    frames = load_video(grey_video, max_fps=max_fps, max_frames=max_frames, image_size=28)
    assert frames.dtype == torch.float32
    if levels is None:  # above the video's own rate every frame is kept
        levels = [10 * i for i in range(24)]
    assert frames.shape == (len(levels), 3, 28, 28)
    torch.testing.assert_close(grey_levels(frames), torch.tensor(levels, dtype=torch.float32), atol=4.0, rtol=0)


def test_load_video_raw_stream_without_timestamps(tmp_path):
    """A raw H.264 elementary stream has no packet timestamps: index / frame rate is used."""
    import av

    if "h264" not in av.codecs_available and "libx264" not in av.codecs_available:
        pytest.skip("no H.264 encoder in this PyAV build")
    path = write_grey_video(tmp_path / "grey.h264", "libx264" if "libx264" in av.codecs_available else "h264")
    frames = load_video(path, max_fps=1.0, image_size=28)
    torch.testing.assert_close(grey_levels(frames), torch.tensor([0.0, 80.0, 160.0]), atol=4.0, rtol=0)


def test_load_video_errors(tmp_path):
    with pytest.raises(InputError, match="missing.mp4.*does not exist"):
        load_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(InputError, match="bad.mp4"):
        load_video(bad)


# ---------------------------------------------------------------- tokenizer
def test_default_tokenizer_round_trip_and_specials():
    tok = build_default_tokenizer()
    assert tok.get_vocab_size() <= 300
    text = "Hello, wörld! 你好\n\ttabs  and spaces"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert max(ids) < 256 and tok.decode(ids) == text
    special = SpecialTokens.from_tokenizer(tok)
    for name, string in SpecialTokens.STRINGS.items():
        assert getattr(special, name) == tok.token_to_id(string)
    assert special.eos_token_id == tok.token_to_id("<|im_end|>")
    assert special.context_token_ids == tuple(tok.token_to_id(t) for t in ("<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>"))


def test_special_tokens_missing(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<img>", "</img>"])
    with pytest.raises(InputError, match="<IMG_CONTEXT>"):
        SpecialTokens.from_tokenizer(tok)
    tok.add_special_tokens(["<IMG_CONTEXT>"])
    special = SpecialTokens.from_tokenizer(tok)  # video/patch tokens are optional
    assert special.vid_context is None and special.context_token_ids == (tok.token_to_id("<IMG_CONTEXT>"),)
    with pytest.raises(InputError, match="<vid>"):
        build_inputs(tok, special, [torch.zeros(1, 3, 4, 4)], tokens_per_tile=1)


def test_load_tokenizer(tmp_path):
    tok = build_default_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    text = "<|im_start|>user\nhi<|im_end|>"
    assert loaded.encode(text).ids == tok.encode(text).ids
    with pytest.raises(InputError, match="nothing.*does not exist"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(InputError, match="tokenizer.json.*corrupt"):
        load_tokenizer(tmp_path / "bad")


# ---------------------------------------------------------------- template
def tiles_of(n_rows, n_cols, S):
    n = 1 + n_rows * n_cols if (n_rows, n_cols) != (1, 1) else 1
    return ImageTiles(torch.randn(n, 3, S, S), (n_rows, n_cols), n > 1)


def expected_prompt(segments, n, system=None):
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n"] if system is not None else []
    parts.append("<|im_start|>user\n")
    for seg in segments:
        if isinstance(seg, str):
            parts.append(seg)
        elif isinstance(seg, ImageTiles):
            parts.append("<img>" + "<IMG_CONTEXT>" * n + "</img>")
            if seg.has_thumbnail:
                for _ in range(seg.grid[0]):
                    parts.append("\n" + ("<patch>" + "<PATCH_CONTEXT>" * n + "</patch>") * seg.grid[1])
        else:
            parts.append(("<vid>" + "<VID_CONTEXT>" * n + "</vid>") * seg.shape[0])
    parts.append("<|im_end|>\n<|im_start|>assistant\n")
    return "".join(parts)


def test_tokens_per_tile():
    assert tokens_per_tile(448) == 256
    assert tokens_per_tile(56) == 4
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tokens_per_tile(50)


@pytest.mark.parametrize("system", [None, "You are helpful."])
def test_build_inputs_interleaved_layout(system):
    tok = build_default_tokenizer()
    special = SpecialTokens.from_tokenizer(tok)
    S, N = 8, 3
    big, video, small = tiles_of(2, 3, S), torch.randn(4, 3, S, S), tiles_of(1, 1, S)
    segments = ["Look: ", big, " then the clip ", video, "and", small, " — what changed?"]
    out = build_inputs(tok, special, segments, tokens_per_tile=N, system=system)

    # ChatML string round trip, and ids identical to tokenising the whole string at once
    text = expected_prompt(segments, N, system)
    assert tok.decode(out.input_ids.tolist(), skip_special_tokens=False) == text
    assert out.input_ids.tolist() == tok.encode(text, add_special_tokens=False).ids
    assert out.input_ids.dtype == torch.long and out.input_ids.dim() == 1

    # pixels follow the placeholders: thumbnail, 6 grid tiles, 4 frames, 1 single tile
    assert torch.equal(out.pixel_values, torch.cat([big.pixel_values, video, small.pixel_values]))
    ids = out.input_ids
    context = torch.tensor(special.context_token_ids)
    is_ctx = torch.isin(ids, context)
    assert int(is_ctx.sum()) == out.pixel_values.shape[0] * N
    kinds = ids[is_ctx].view(-1, N)  # one row per tile, in token order
    assert (kinds == kinds[:, :1]).all(), "each tile's N context tokens are contiguous and of one kind"
    expected_kinds = [special.img_context] + [special.patch_context] * 6 + [special.vid_context] * 4 + [special.img_context]
    assert kinds[:, 0].tolist() == expected_kinds
    assert (ids == special.im_end).sum() == (2 if system else 1) and ids[-1] != special.im_end


def test_build_inputs_text_only_and_errors():
    tok = build_default_tokenizer()
    special = SpecialTokens.from_tokenizer(tok)
    out = build_inputs(tok, special, ["just text"], tokens_per_tile=4)
    assert out.pixel_values is None
    assert tok.decode(out.input_ids.tolist(), skip_special_tokens=False) == expected_prompt(["just text"], 4)
    with pytest.raises(InputError, match="<IMG_CONTEXT>"):
        build_inputs(tok, special, ["sneaky <IMG_CONTEXT> token"], tokens_per_tile=4)
    with pytest.raises(InputError, match="segment 0 must be"):
        build_inputs(tok, special, [42], tokens_per_tile=4)
    with pytest.raises(InputError, match=r"segment 0 \(video\)"):
        build_inputs(tok, special, [torch.zeros(3, 8, 8)], tokens_per_tile=4)
    with pytest.raises(InputError, match=r"segment 1 \(video\) has tiles of shape"):
        build_inputs(tok, special, [tiles_of(1, 1, 8), torch.zeros(2, 3, 16, 16)], tokens_per_tile=4)


def test_build_inputs_ids_not_hard_coded():
    """A tokenizer holding the same special tokens at other ids gives the same layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = build_default_tokenizer()
    rev = Tokenizer(models.BPE(vocab=tok.get_vocab(with_added_tokens=False), merges=[]))
    rev.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rev.decoder = decoders.ByteLevel()
    rev.add_special_tokens([AddedToken(t, special=True) for t in reversed(SPECIAL_TOKENS)])
    s_tok, s_rev = SpecialTokens.from_tokenizer(tok), SpecialTokens.from_tokenizer(rev)
    assert s_tok.img_context != s_rev.img_context
    segs = ["a", tiles_of(1, 2, 8), torch.randn(2, 3, 8, 8)]
    a = build_inputs(tok, s_tok, segs, tokens_per_tile=2)
    b = build_inputs(rev, s_rev, segs, tokens_per_tile=2)
    assert not torch.equal(a.input_ids, b.input_ids)
    decode = lambda t, ids: t.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
    assert decode(tok, a.input_ids) == decode(rev, b.input_ids) == expected_prompt(segs, 2)
