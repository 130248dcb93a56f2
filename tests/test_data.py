"""Inputs: image tiling against InternVL's algorithm and both preprocessing families
(transformers' InternVL processor; an independent transcription of Long-VITA's rules),
video frame selection, large and damaged inputs, the in-code tokenizer and the ChatML +
media token layout."""

import json
import math
import random
import warnings

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
    read_video,
    tile_image,
    tokens_per_tile,
    VideoWarning,
)
from longvita.data.image import to_tensor
from longvita.data.video import frame_indices, frame_tile, internvl_frame_indices, long_vita_frame_indices


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


def test_single_tile_is_squashed_in_both_families():
    S = 40
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = (200, 100, 50)
    img = Image.fromarray(arr)
    for pre in ("long-vita", "internvl"):
        tiles = tile_image(img, image_size=S, max_num=1, preprocess=pre)
        assert tiles.grid == (1, 1) and not tiles.has_thumbnail and tiles.pixel_values.shape == (1, 3, S, S)
        # squashed, not padded: the top and bottom rows hold image content, no fill colour
        expected = to_tensor(img.resize((S, S), Image.Resampling.BICUBIC))
        assert torch.equal(tiles.pixel_values[0], expected)
        torch.testing.assert_close(tiles.pixel_values[0, :, 0, 0], normalised((0, 0, 0)), atol=1e-5, rtol=0)
        torch.testing.assert_close(tiles.pixel_values[0, :, 0, -1], normalised((200, 100, 50)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- preprocessing families
# Long-VITA's rules, transcribed from its ImageProcessor (long_vita/data/processor/
# image_processor.py: dynamic_preprocess, process_images, get_video_frames) independently
# of longvita.data, to hold the implementation to them.
LV_BACKGROUND = tuple(int(x * 255) for x in IMAGENET_MEAN)


def lv_expand2square(img, background):
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def lv_process_images(images, S):
    out = torch.ones(len(images), 3, S, S)
    for i, img in enumerate(images):
        img = lv_expand2square(img.convert("RGB"), LV_BACKGROUND).resize((S, S), resample=Image.Resampling.BICUBIC)
        a = np.array(img, dtype=np.float32) * 1.0 / 255.0
        a = (a - np.array(IMAGENET_MEAN, dtype=a.dtype)) / np.array(IMAGENET_STD, dtype=a.dtype)
        out[i] = torch.tensor(a, dtype=torch.float32).permute(2, 0, 1)
    return out


def lv_dynamic_tiles(img, S, max_num):
    w, h = img.size
    cols, rows = internvl_grid(w, h, S, 1, max_num)
    resized = img.resize((S * cols, S * rows))  # Pillow's default filter for RGB: bicubic
    crops = [resized.crop(((i % cols) * S, (i // cols) * S, (i % cols + 1) * S, (i // cols + 1) * S))
             for i in range(cols * rows)]
    if len(crops) != 1:
        crops = [img.resize((S, S))] + crops  # the thumbnail, squashed, first
    return lv_process_images(crops, S), (rows, cols)


def lv_frame_indices(n_frames, fps, max_fps, num_frames):
    step_size = n_frames / (num_frames + 1)
    step_size = max(fps / max_fps, step_size)
    indices = [int(i * step_size) for i in range(0, num_frames)]
    return [i for i in indices if i < n_frames]


def internvl_reference_indices(n_frames, fps, max_fps, max_frames):
    """transformers' InternVLVideoProcessor.sample_frames(fps=max_fps) with the count capped:
    centres of equal segments, computed as torch.arange does (double, stored in float32)."""
    num = min(max(int(n_frames / fps * max_fps), 1), max_frames, n_frames)
    step = n_frames / num
    start = step / 2
    count = math.ceil((n_frames - start) / step)
    return [int(np.float32(start + i * step)) for i in range(count)]


def random_photo(w, h, seed):
    """Smooth colour field plus noise: resampling differences show, unlike flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


FAMILY_SIZES = [(56, 56), (1, 1), (3, 2), (2, 300), (300, 2), (97, 41), (41, 97), (170, 45), (45, 170),
                (112, 112), (168, 56), (500, 380), (380, 500), (233, 61), (1000, 999), (60, 400)]


def test_long_vita_family_matches_its_processor():
    rng = random.Random(torch.initial_seed())
    sizes = FAMILY_SIZES + [(rng.randint(1, 700), rng.randint(1, 700)) for _ in range(20)]
    for k, (w, h) in enumerate(sizes):
        img = random_photo(w, h, k)
        for S, max_num in ((56, 12), (56, 6), (28, 1)):
            ref, grid = lv_dynamic_tiles(img, S, max_num)
            got = tile_image(img, image_size=S, max_num=max_num, preprocess="long-vita")
            assert got.grid == grid and got.has_thumbnail == (grid != (1, 1)) and got.preprocess == "long-vita"
            assert torch.equal(got.pixel_values, ref), (w, h, S, max_num)
    # full-size tiles too: square, wide, tall
    for w, h in ((448, 448), (900, 300), (300, 700)):
        img = random_photo(w, h, w)
        assert torch.equal(tile_image(img).pixel_values, lv_dynamic_tiles(img, 448, 12)[0])


def test_internvl_family_matches_transformers_processor():
    pytest.importorskip("transformers")
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    rng = random.Random(torch.initial_seed() + 1)
    cases = [(w, h, 56) for w, h in FAMILY_SIZES] + [(rng.randint(1, 800), rng.randint(1, 800), 56) for _ in range(30)]
    cases += [(448, 448, 448), (1000, 300, 448), (300, 1000, 448), (37, 900, 448), (5, 5, 448), (700, 520, 448)]
    processors = {}
    for k, (w, h, S) in enumerate(cases):
        if S not in processors:
            processors[S] = GotOcr2ImageProcessorPil(
                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, size={"height": S, "width": S},
                crop_to_patches=True, min_patches=1, max_patches=12,
            )
        img = random_photo(w, h, 100 + k)
        ref = processors[S](images=[img], return_tensors="pt")
        got = tile_image(img, image_size=S, max_num=12, preprocess="internvl")
        assert got.num_tiles == int(ref["num_patches"][0]), (w, h, S)
        assert torch.equal(got.pixel_values, ref["pixel_values"]), (w, h, S)  # thumbnail (last) included


def test_thumbnail_position_per_family():
    S = 28
    img = random_photo(3 * S, S, 7)
    lv = tile_image(img, image_size=S, preprocess="long-vita")
    iv = tile_image(img, image_size=S, preprocess="internvl")
    assert lv.grid == iv.grid == (1, 3)
    thumb = to_tensor(img.resize((S, S), Image.Resampling.BICUBIC))
    assert torch.equal(lv.pixel_values[0], thumb) and torch.equal(iv.pixel_values[-1], thumb)
    assert torch.equal(lv.pixel_values[1:], iv.pixel_values[:-1])
    with pytest.raises(ValueError, match="preprocess must be one of"):
        tile_image(img, image_size=S, preprocess="llava")


def test_long_vita_frame_indices_rule():
    for n in (1, 7, 30, 5000):
        for fps in (2, 25, 30, 29.97):
            for max_fps in (1.0, 0.5, 4.0):
                for max_frames in (4096, 16, 3, 1):
                    expected = lv_frame_indices(n, fps, max_fps, max_frames)
                    assert long_vita_frame_indices(n, fps, max_fps=max_fps, max_frames=max_frames) == expected, (n, fps)
                    assert frame_indices(n, fps, preprocess="long-vita", max_fps=max_fps, max_frames=max_frames) == expected
    # spot values: 5000 frames at 30 fps, 1 frame per second -> every 30th frame
    assert long_vita_frame_indices(5000, 30.0) == list(range(0, 5000, 30))
    assert long_vita_frame_indices(5000, 30.0, max_frames=16) == [int(i * 5000 / 17) for i in range(16)]
    assert long_vita_frame_indices(7, 2.0, max_fps=4.0) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]  # repeats
    with pytest.raises(ValueError, match="max_fps"):
        long_vita_frame_indices(10, 30.0, max_fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        long_vita_frame_indices(10, 30.0, max_frames=0)


def test_internvl_frame_indices_rule():
    for n in (1, 7, 30, 5000):
        for fps in (2, 25, 30, 29.97):
            for max_fps in (1.0, 0.5, 4.0):
                for max_frames in (4096, 16, 3, 1):
                    got = internvl_frame_indices(n, fps, max_fps=max_fps, max_frames=max_frames)
                    assert got == internvl_reference_indices(n, fps, max_fps, max_frames), (n, fps, max_fps, max_frames)
                    num = len(got)
                    assert 1 <= num <= min(max_frames, n) and got == sorted(set(got))
                    for k, idx in enumerate(got):  # the middle of segment k of num
                        assert k * n // num <= idx < -(-(k + 1) * n // num)
    assert internvl_frame_indices(5000, 30.0) == [int(np.float32(5000 / 166 * (k + 0.5))) for k in range(166)]
    try:  # transformers' own sampler, where torchvision lets it import
        from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
        from transformers.video_utils import VideoMetadata
    except ImportError:
        return
    vp = InternVLVideoProcessor()
    for n, fps in ((7, 2), (30, 25), (5000, 30), (5000, 29.97)):
        ref = vp.sample_frames(VideoMetadata(total_num_frames=n, fps=fps), fps=1.0).tolist()
        assert internvl_frame_indices(n, fps) == ref


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32), (1, 3)])
def test_frame_tiles_per_family(shape):
    w, h = shape
    img = random_photo(w, h, w * h)
    S = 28
    assert torch.equal(frame_tile(img, S, "long-vita"), lv_process_images([img], S)[0])
    assert torch.equal(frame_tile(img, S, "internvl"), to_tensor(img.resize((S, S), Image.Resampling.BICUBIC)))
    if w != h:  # Long-VITA pads with the ImageNet mean (123, 116, 103), not the frame's own mean
        big = random_photo(4 * w, 4 * h, 1)
        tile = frame_tile(big, 4 * max(w, h), "long-vita")
        corner = tile[:, 0, 0] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)  # padding either way
        torch.testing.assert_close(corner * 255, torch.tensor([123.0, 116.0, 103.0]), atol=1e-3, rtol=0)


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
    with pytest.raises(ValueError, match="min_num <= max_num") as exc:  # an option, not the file
        load_image(good, max_num=0)
    assert not isinstance(exc.value, InputError)
    with pytest.raises(ValueError, match="image_size must be positive"):
        load_image(good, image_size=0)


# ---------------------------------------------------------------- video
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
    pytest.importorskip("av")
    return write_grey_video(tmp_path_factory.mktemp("video") / "grey.mp4", "mpeg4")


def grey_levels(frames):
    # undo the normalisation of the red channel and average the middle rows (the 64x48
    # frames are padded above and below): the frame's grey level
    S = frames.shape[-1]
    return (frames[:, 0, S // 3: 2 * S // 3].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255


@pytest.mark.parametrize(
    "max_fps, max_frames, levels",
    [(1.0, 4096, [0, 80, 160]), (2.0, 4096, [0, 40, 80, 120, 160, 200]), (1.0, 2, [0, 80]),
     (100.0, 4096, [10 * int(i * 0.08) for i in range(300)])],  # faster than the video: frames repeat
)
def test_load_video_samples_frames(grey_video, max_fps, max_frames, levels):
    frames = load_video(grey_video, max_fps=max_fps, max_frames=max_frames, image_size=28)
    assert frames.dtype == torch.float32
    assert frames.shape == (len(levels), 3, 28, 28)
    torch.testing.assert_close(grey_levels(frames), torch.tensor(levels, dtype=torch.float32), atol=4.0, rtol=0)


def write_video(path, n_frames, fps, width, height, seed=0, faststart=False, noise=0):
    """n_frames of distinct smooth pictures (plus optional noise, which makes packets big)."""
    import av

    rng = np.random.default_rng(seed)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            arr = np.asarray(random_photo(width, height, seed + i), dtype=np.float64)
            arr = (arr + 37 * i) % 256 + (rng.normal(0, noise, arr.shape) if noise else 0)
            frame = av.VideoFrame.from_ndarray(np.clip(arr, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def decode_all(path):
    """Every frame of a video as PIL images, in presentation order, and its average rate."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = sorted(((f.pts, f.to_image()) for f in c.decode(stream)), key=lambda x: x[0])
        return [im for _, im in frames], float(stream.average_rate)


@pytest.mark.parametrize("n_frames", [1, 7, 30])
@pytest.mark.parametrize("fps", [2, 25, 30])
def test_video_families_match_their_rules(tmp_path, n_frames, fps):
    pytest.importorskip("av")
    size = (40, 24) if n_frames % 2 else (24, 40)  # wide and tall: the padding shows
    path = write_video(tmp_path / "clip.mp4", n_frames, fps, *size, seed=n_frames + fps)
    images, rate = decode_all(path)
    assert len(images) == n_frames and rate == fps
    S = 28
    for max_fps in (1.0, 4.0):
        lv = read_video(path, image_size=S, max_fps=max_fps, preprocess="long-vita")
        expected = lv_frame_indices(n_frames, fps, max_fps, 4096)
        assert lv.indices == expected and lv.n_frames == n_frames and lv.declared_frames == n_frames
        assert torch.equal(lv.pixel_values, lv_process_images([images[i] for i in expected], S))

        iv = read_video(path, image_size=S, max_fps=max_fps, preprocess="internvl")
        expected = internvl_reference_indices(n_frames, fps, max_fps, 4096)
        assert iv.indices == expected
        squashed = torch.stack([to_tensor(images[i].resize((S, S), Image.Resampling.BICUBIC)) for i in expected])
        assert torch.equal(iv.pixel_values, squashed)
    assert torch.equal(load_video(path, image_size=S, max_frames=2), lv_process_images(
        [images[i] for i in lv_frame_indices(n_frames, fps, 1.0, 2)], S))


def test_truncated_video_warns_and_reports_frames(tmp_path):
    """An mp4 with its index at the front, cut in half: the index declares every frame,
    the data holds about half; the frames present are used, with one warning."""
    pytest.importorskip("av")
    full = write_video(tmp_path / "full.mp4", 25, 5, 64, 48, faststart=True, noise=40)
    data = full.read_bytes()
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")  # index first
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(VideoWarning) as record:
        video = read_video(cut, image_size=28, max_fps=5.0)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "cut.mp4" in msg and "of the 25 frames" in msg and "\n" not in msg
    assert 0 < video.n_frames < 25 and video.declared_frames == 25
    assert video.indices == list(range(video.n_frames))  # 5 fps at max_fps 5: every frame present
    assert video.pixel_values.shape == (video.n_frames, 3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the intact file: no warning
        assert read_video(full, image_size=28, max_fps=5.0).indices == list(range(25))


def test_undecodable_packets_warn(tmp_path):
    pytest.importorskip("av")
    path = write_video(tmp_path / "noisy.mp4", 25, 5, 64, 48, noise=40)
    data = bytearray(path.read_bytes())
    start = data.find(b"mdat") + 8
    data[start + 200: start + (len(data) - start) // 2] = b"\xff" * (((len(data) - start) // 2) - 200)
    bad = tmp_path / "damaged.mp4"
    bad.write_bytes(bytes(data))
    with pytest.warns(VideoWarning, match=r"damaged\.mp4.*decoded \d+ of the 25 frames selected"):
        video = read_video(bad, image_size=28, max_fps=5.0)
    assert 0 < len(video.indices) < 25 and video.pixel_values.shape[0] == len(video.indices)


def test_load_video_raw_stream_without_timestamps(tmp_path):
    """A raw H.264 elementary stream has no packet timestamps: index / frame rate is used."""
    av = pytest.importorskip("av")

    if "h264" not in av.codecs_available and "libx264" not in av.codecs_available:
        pytest.skip("no H.264 encoder in this PyAV build")
    path = write_grey_video(tmp_path / "grey.h264", "libx264" if "libx264" in av.codecs_available else "h264")
    frames = load_video(path, max_fps=1.0, image_size=28)
    torch.testing.assert_close(grey_levels(frames), torch.tensor([0.0, 80.0, 160.0]), atol=4.0, rtol=0)


def test_load_video_errors(tmp_path):
    with pytest.raises(InputError, match="missing.mp4.*does not exist"):
        load_video(tmp_path / "missing.mp4")  # needs no PyAV
    pytest.importorskip("av")
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


def expected_internvl_prompt(segments, n):
    """transformers' InternVLProcessor layout: one <img> block per image holding every tile,
    video frames joined by newlines as 'Frame{i}: <img>...</img>'."""
    parts = ["<|im_start|>user\n"]
    for seg in segments:
        if isinstance(seg, str):
            parts.append(seg)
        elif isinstance(seg, ImageTiles):
            parts.append("<img>" + "<IMG_CONTEXT>" * (n * seg.num_tiles) + "</img>")
        else:
            parts.append("\n".join(f"Frame{i + 1}: <img>" + "<IMG_CONTEXT>" * n + "</img>" for i in range(seg.shape[0])))
    parts.append("<|im_end|>\n<|im_start|>assistant\n")
    return "".join(parts)


def test_build_inputs_internvl_layout():
    tok = build_default_tokenizer()
    special = SpecialTokens.from_tokenizer(tok)
    S, N = 8, 3
    img = random_photo(3 * S, 2 * S, 5)
    big = tile_image(img, image_size=S, preprocess="internvl")
    small = tile_image(random_photo(S, S, 6), image_size=S, preprocess="internvl")
    video = torch.randn(3, 3, S, S)
    segments = ["Look: ", big, " then ", video, "and", small, " ok?"]
    out = build_inputs(tok, special, segments, tokens_per_tile=N, preprocess="internvl")
    text = expected_internvl_prompt(segments, N)
    assert tok.decode(out.input_ids.tolist(), skip_special_tokens=False) == text
    assert out.input_ids.tolist() == tok.encode(text, add_special_tokens=False).ids
    # pixels in token order: grid tiles, thumbnail last, frames, the single tile
    assert big.grid == (2, 3) and big.num_tiles == 7
    thumb = to_tensor(img.resize((S, S), Image.Resampling.BICUBIC))
    assert torch.equal(out.pixel_values[6], thumb)
    assert torch.equal(out.pixel_values, torch.cat([big.pixel_values, video, small.pixel_values]))
    assert int((out.input_ids == special.img_context).sum()) == out.pixel_values.shape[0] * N
    assert not torch.isin(out.input_ids, torch.tensor([special.patch_context, special.vid_context])).any()
    # tiles made for the other family are refused (the thumbnail would be misplaced)
    with pytest.raises(InputError, match=r"segment 0 \(image\) was tiled for preprocess='long-vita'"):
        build_inputs(tok, special, [tile_image(img, image_size=S)], tokens_per_tile=N, preprocess="internvl")
    with pytest.raises(ValueError, match="preprocess must be one of"):
        build_inputs(tok, special, ["x"], tokens_per_tile=N, preprocess="InternVL")


def test_preprocess_names_agree_with_model_config():
    from longvita.data import PREPROCESS_FAMILIES
    from longvita.model import config as model_config

    assert model_config.PREPROCESS_FAMILIES == PREPROCESS_FAMILIES
    assert model_config.preset("tiny").preprocess == "long-vita"  # the embedded default
    cfg = model_config.preset("tiny")
    cfg.preprocess = "llava"
    with pytest.raises(ValueError, match="preprocess must be one of"):
        cfg.validate()


# ---------------------------------------------------------------- large images
@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    """12000 x 9000 (108 MP, above Pillow's 89 MP warning threshold); flat colours encode fast."""
    path = tmp_path_factory.mktemp("big") / "huge.jpg"
    img = Image.new("RGB", (12000, 9000), (200, 120, 40))
    img.paste((20, 90, 220), (3000, 2000, 9000, 7000))
    img.save(path, quality=90)
    return path


def test_huge_jpeg_is_decoded_reduced_without_warning(huge_jpeg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not leak
        img = load_image(huge_jpeg)
    # tiles need a 1792x1344 canvas (4x3 grid of 448); decoded at 1/2 scale, still >= 3x that
    assert img.size == (6000, 4500) and img.info["original_size"] == (12000, 9000)
    tiles = tile_image(img)
    assert tiles.grid == choose_grid(12000, 9000) == (3, 4) and tiles.num_tiles == 13
    # the inner rectangle lands where it should: tile (row 1, col 1) is inside it
    inner = normalised((20, 90, 220)).view(3, 1, 1)
    centre = tiles.pixel_values[1 + 4 + 1, :, 8:-8, 8:-8]  # its left edge is the rectangle's: skip ringing
    torch.testing.assert_close(centre, inner.expand(3, 432, 432), atol=0.05, rtol=0)


def test_reduced_decode_keeps_tiles_and_grid(tmp_path):
    S = 28
    yy, xx = np.mgrid[0:1800, 0:2400].astype(np.float32)
    waves = [127 + 100 * np.sin(xx / (37 + 11 * c) + c) * np.cos(yy / (53 - 7 * c)) for c in range(3)]
    noise = np.random.default_rng(3).normal(0, 5, (1800, 2400, 3))  # camera-like smooth content
    src = Image.fromarray(np.clip(np.stack(waves, -1) + noise, 0, 255).astype(np.uint8))
    jpg, png = tmp_path / "photo.jpg", tmp_path / "photo.png"
    src.save(jpg, quality=95)
    src.save(png, compress_level=1)
    full = {p: Image.open(p).convert("RGB") for p in (jpg, png)}
    for path, size in ((jpg, (600, 450)), (png, (343, 258))):
        img = load_image(path, image_size=S)
        # the 4x3 grid's canvas is 112x84: JPEG decodes at 1/4 (DCT scaling), PNG is box-
        # reduced by 7; both stay >= 3x the canvas
        assert img.size == size and img.info["original_size"] == (2400, 1800), path
        for pre in ("long-vita", "internvl"):
            got = tile_image(img, image_size=S, preprocess=pre)
            ref = tile_image(full[path], image_size=S, preprocess=pre)
            assert got.grid == ref.grid == (3, 4)
            err = (got.pixel_values - ref.pixel_values).abs()
            # within a few grey levels (0.0175 = 1 level in normalised units)
            assert err.mean() < 0.02 and err.max() < 0.1, (path, float(err.mean()), float(err.max()))
    # the record goes stale once the picture changes size: then it is a plain image
    cropped = load_image(png, image_size=S).crop((0, 0, 200, 100))
    assert tile_image(cropped, image_size=S).grid == choose_grid(200, 100, image_size=S)


def test_small_images_decode_exactly(tmp_path):
    for k, (w, h, fmt) in enumerate(((1000, 700, "JPEG"), (640, 2000, "PNG"), (3, 5, "PNG"))):
        path = tmp_path / f"img{k}.{fmt.lower()}"
        random_photo(w, h, k).save(path, fmt)
        img = load_image(path)
        ref = Image.open(path).convert("RGB")
        assert img.size == ref.size and "original_size" not in img.info
        assert np.array_equal(np.asarray(img), np.asarray(ref))


def write_png_header(path, width, height):
    """A PNG whose header declares width x height over a few bytes of data: a real
    decompression bomb as far as the header goes."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_input_error(tmp_path, monkeypatch):
    bomb = write_png_header(tmp_path / "bomb.png", 16000, 12000)
    with pytest.raises(InputError, match=r"bomb\.png.*too large") as exc:
        load_image(bomb)
    assert "\n" not in str(exc.value)
    # between Pillow's warning and error thresholds: decoded, and nothing leaks
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 * 3 // 4)
    path = tmp_path / "biggish.png"
    random_photo(300, 200, 1).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (300, 200)


@pytest.mark.parametrize("preprocess", ["long-vita", "internvl"])
def test_raw_video_frames_normalise_to_the_float_tiles(tmp_path, preprocess):
    """read_video(raw=True) keeps uint8 pixels; normalize() gives the float tiles bit for bit."""
    pytest.importorskip("av")
    from longvita.data.image import normalize
    from longvita.data.video import read_video

    path = write_video(tmp_path / "clip.mp4", 7, 2, 64, 48, seed=int(torch.randint(0, 2**31, ())))
    tiles = read_video(path, image_size=56, preprocess=preprocess)
    raw = read_video(path, image_size=56, preprocess=preprocess, raw=True)
    assert raw.pixel_values.dtype == torch.uint8 and raw.indices == tiles.indices
    assert torch.equal(normalize(raw.pixel_values), tiles.pixel_values)
