"""Configs say what the code does; the decoder's per-step work; the model + tokenizer binding."""

from __future__ import annotations

import json

import pytest
import torch

from longvita.model import CheckpointError, LongVITA, LongVITAConfig, TextConfig, preset
from longvita.runtime import LocalPlan, generate

from _model import logits


def test_text_head_dim_is_always_resolved():
    assert TextConfig(hidden_size=64, num_heads=4).head_dim == 16
    assert TextConfig(hidden_size=64, num_heads=4, head_dim=32).head_dim == 32  # explicit (Qwen3-style)
    cfg = preset("tiny")
    assert cfg.text.head_dim == cfg.text.hidden_size // cfg.text.num_heads
    assert cfg.vision.head_dim == cfg.vision.hidden_size // cfg.vision.num_heads


def test_explicit_head_dim_builds_and_round_trips(tmp_path):
    cfg = preset("tiny")
    cfg.text.head_dim = 24  # 4 heads x 24 = 96, wider than hidden 64
    model = LongVITA(cfg.validate()).eval()
    assert model.text.layers[0].self_attn.q_proj.weight.shape == (4 * 24, 64)
    model.save_pretrained(str(tmp_path))
    again = LongVITA.from_pretrained(str(tmp_path))
    assert again.config.text.head_dim == 24
    ids = torch.randint(0, 500, (9,))
    with torch.no_grad():
        assert torch.allclose(logits(model, ids), logits(again, ids))


@pytest.mark.parametrize("where,value", [("vision", "relu"), ("projector", "gelu_pytorch_tanh"), ("text", "gelu")])
def test_unimplemented_activation_is_rejected(where, value):
    cfg = preset("tiny")
    setattr(getattr(cfg, where), "hidden_act", value)
    with pytest.raises(ValueError, match=f"{where}.hidden_act '{value}' is not implemented"):
        cfg.validate()


def test_checkpoint_with_unimplemented_activation_names_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    LongVITA(preset("tiny")).save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = "gelu_new"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"ckpt.config\.json.*gelu_new"):
        LongVITA.from_pretrained(str(folder))


def test_generate_rejects_an_empty_prompt():
    model = LongVITA(preset("tiny")).eval()
    with pytest.raises(ValueError, match="non-empty"):
        next(generate(model, torch.zeros(0, dtype=torch.long)))


def test_generate_rejects_a_prompt_past_max_positions():
    cfg = preset("tiny")
    cfg.text.max_position_embeddings = 20
    model = LongVITA(cfg).eval()
    with pytest.raises(ValueError, match="max_position_embeddings is 20"):
        next(generate(model, torch.zeros(15, dtype=torch.long), max_new_tokens=6))
    assert len(list(generate(model, torch.zeros(15, dtype=torch.long), max_new_tokens=5))) == 5


def test_decode_builds_document_offsets_once_per_step_not_per_layer(monkeypatch):
    from longvita.model import attention

    made = []
    real_init = attention.CachedAttention.__init__

    def counting_init(self, cache, new_tokens, device):
        made.append((new_tokens, cache.length + new_tokens))
        real_init(self, cache, new_tokens, device)

    monkeypatch.setattr(attention.CachedAttention, "__init__", counting_init)
    model = LongVITA(preset("tiny")).eval()
    assert model.config.text.num_layers >= 2
    tokens = list(generate(model, torch.randint(0, 500, (7,)), max_new_tokens=4))
    # one prefill + one forward per token after the first (the last token needs none):
    # never one per layer
    assert len(tokens) == 4
    assert made == [(7, 7), (1, 8), (1, 9), (1, 10)]


def test_inputs_embeds_and_place_media_equal_the_pixel_path():
    """Media encoded elsewhere and placed into the embeddings give the same logits."""
    cfg = preset("tiny")
    cfg.image_token_ids = (500,)
    model = LongVITA(cfg).eval()
    n = cfg.tokens_per_tile
    ids = torch.cat([torch.randint(0, 400, (5,)), torch.full((2 * n,), 500), torch.randint(0, 400, (3,))])
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        want = logits(model, ids, pixels)
        tiles = model.image_embeddings(pixels)  # (2 * n, hidden): "computed elsewhere"
        slots = model.media_mask(ids).nonzero().squeeze(1)
        embeds = LongVITA.place_media(model.text.embed_tokens(ids), slots, tiles)
        got = logits(model, None, inputs_embeds=embeds)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inputs_embeds must be a 2-D"):  # the decoder takes embeddings only
        model(ids)


def test_custom_attention_is_called_by_every_layer():
    """The decoder's attention is pluggable from outside the model."""
    from longvita.model import DecoderAttention, PackedAttention

    class Spy(DecoderAttention):  # implies no positions: the caller must give them
        def __init__(self, *a):
            self.inner = PackedAttention(*a)
            self.layers, self.finished = [], 0

        def attend(self, layer_idx, q, k, v):
            self.layers.append(layer_idx)
            return self.inner.attend(layer_idx, q, k, v)

        def finish(self):
            self.finished += 1

    model = LongVITA(preset("tiny")).eval()
    ids = torch.randint(0, 500, (11,))
    spy = Spy(torch.tensor([0, 11], dtype=torch.int32), 11)
    with torch.no_grad():
        got = model.logits(model(model.embed(ids), torch.arange(11), spy))
        want = logits(model, ids)
    assert spy.layers == list(range(model.config.text.num_layers)) and spy.finished == 1
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="position_ids are required"):
        model(model.embed(ids), attention=spy)


def test_bind_tokenizer_sets_placeholder_ids_and_checks_the_vocabulary():
    from longvita.data import build_default_tokenizer
    from longvita.pipeline import bind_tokenizer

    tok = build_default_tokenizer()
    cfg = preset("tiny")
    cfg.text.vocab_size = tok.get_vocab_size()
    model = LongVITA(cfg)
    special = bind_tokenizer(model, tok)
    assert model.config.image_token_ids == special.context_token_ids and len(special.context_token_ids) == 3
    small = preset("tiny")
    small.text.vocab_size = 100
    with pytest.raises(ValueError, match="vocabulary has 100 rows"):
        bind_tokenizer(LongVITA(small), tok)


def _media_prompt(cfg, n_tiles: int, text=(6, 5, 4)):
    """Text, n_tiles tiles of context tokens (one slot id), text: a prompt with media."""
    n = cfg.tokens_per_tile
    parts = [torch.randint(0, 400, (text[0],))]
    for t in range(n_tiles):
        parts += [torch.full((n,), 500), torch.randint(0, 400, (text[1 + t % 2],))]
    return torch.cat(parts)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_prefill_equals_unchunked(chunk, monkeypatch):
    """Chunks that cut through tiles (tokens_per_tile = 4 in tiny) give the same tokens."""
    cfg = preset("tiny")
    cfg.image_token_ids = (500,)
    model = LongVITA(cfg).double().eval()
    ids = _media_prompt(cfg, 3)
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, dtype=torch.float64)
    from longvita.runtime import Sampling

    rows = []  # every logit row generate chooses from: tokens alone can hide a wrong prefill
    real_call = Sampling.__call__
    monkeypatch.setattr(Sampling, "__call__", lambda self, logits, g=None: (rows.append(logits.clone()), real_call(self, logits, g))[1])
    want = list(generate(model, ids, pixels, max_new_tokens=5))
    want_rows, rows[:] = list(rows), []
    fractions = []
    got = list(generate(model, ids, pixels, plan=LocalPlan(prefill_chunk=chunk), max_new_tokens=5,
                        prefill_progress=fractions.append))
    assert got == want
    assert len(fractions) == -(-ids.numel() // chunk) and fractions == sorted(fractions) and fractions[-1] == 1.0
    for a, b in zip(rows, want_rows, strict=True):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-12
    # and the same as recomputing the whole sequence at every step (no cache at all);
    # generated tokens are text even when a random model picks the placeholder id
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        for tok, row in zip(want, want_rows):
            full = logits(model, None, inputs_embeds=embeds)[-1]
            assert int(full.argmax()) == tok and ((full - row).abs().max() / row.abs().max()).item() < 1e-12
            embeds = torch.cat([embeds, model.text.embed_tokens(torch.tensor([tok]))])


def test_embed_rows_encodes_only_the_tiles_it_needs():
    cfg = preset("tiny")
    cfg.image_token_ids = (500,)
    model = LongVITA(cfg).eval()
    ids = _media_prompt(cfg, 4)
    pixels = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size)
    seen = []
    real = model.image_embeddings
    model.image_embeddings = lambda p: (seen.append(p.shape[0]), real(p))[1]
    with torch.no_grad():
        full = model.embed(ids, pixels)
        seen.clear()
        mask = model.media_mask(ids)
        second_tile = mask.nonzero().squeeze(1)[cfg.tokens_per_tile : 2 * cfg.tokens_per_tile]
        rows = torch.cat([torch.arange(0, 3), second_tile[1:3]])  # text + part of tile 1
        got, n_tiles = model.embed_rows(ids, pixels, rows, tiles_per_chunk=1)
    assert n_tiles == 1 and seen == [1]
    assert torch.allclose(got, full[rows], atol=1e-6)
    with torch.no_grad():
        seen.clear()
        got, n_tiles = model.embed_rows(ids, pixels, torch.arange(ids.numel()), tiles_per_chunk=3)
    assert n_tiles == 4 and seen == [3, 1]  # bounded chunks of tiles
    assert torch.allclose(got, full, atol=1e-6)


def test_sampling_filters():
    from longvita.runtime import Sampling

    logits = torch.tensor([0.0, 5.0, 4.9, 1.0, -3.0])
    assert Sampling()(logits) == 1
    g = torch.Generator().manual_seed(0)
    draws = {Sampling(1.0, top_k=2)(logits, g) for _ in range(200)}
    assert draws == {1, 2}
    # top_p: tokens 1 and 2 hold ~99% of the mass; 0.5 keeps only the first
    assert {Sampling(1.0, top_p=0.5)(logits, g) for _ in range(50)} == {1}
    assert {Sampling(1.0, top_p=0.9)(logits, g) for _ in range(200)} == {1, 2}
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_uint8_pixels_are_normalised_by_the_encoder_exactly():
    """Raw frames (uint8) give the same embeddings as frames normalised by longvita.data."""
    from longvita.data.image import normalize

    model = LongVITA(preset("tiny")).eval()
    s = model.config.vision.image_size
    raw = torch.randint(0, 256, (3, 3, s, s), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model.image_embeddings(raw), model.image_embeddings(normalize(raw)))


def test_trained_length_round_trips_and_old_configs_load(tmp_path):
    """config.json records the trained context length (longvita_trained_length) and the
    loader reads it back; a folder without the key (older longvita, other tools) loads with
    it unknown (None), and a bad value names the key and the file."""
    from longvita.model.checkpoint import read_config

    cfg = preset("tiny")
    cfg.trained_length = 2048
    LongVITA(cfg).save_pretrained(str(tmp_path / "new"))
    assert json.loads((tmp_path / "new" / "config.json").read_text())["longvita_trained_length"] == 2048
    assert LongVITA.from_pretrained(str(tmp_path / "new")).config.trained_length == 2048
    assert read_config(str(tmp_path / "new")).trained_length == 2048
    assert LongVITAConfig.from_dict(cfg.to_dict()).trained_length == 2048

    LongVITA(preset("tiny")).save_pretrained(str(tmp_path / "old"))  # unknown: the key is not written
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    assert "longvita_trained_length" not in raw
    assert LongVITA.from_pretrained(str(tmp_path / "old")).config.trained_length is None
    for bad in ("2048", -1, 1.5, True):
        (tmp_path / "old" / "config.json").write_text(json.dumps(dict(raw, longvita_trained_length=bad)))
        with pytest.raises(CheckpointError, match=r"old.config\.json.*longvita_trained_length"):
            LongVITA.from_pretrained(str(tmp_path / "old"))


def test_generate_warns_once_past_the_trained_length(monkeypatch):
    import warnings

    monkeypatch.setenv("LONGVITA_BACKEND", "torch")  # the kernels' interpreter would only make it slow

    from longvita.model import ContextLengthWarning

    cfg = preset("tiny")
    cfg.trained_length = 20
    model = LongVITA(cfg).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(list(generate(model, torch.zeros(15, dtype=torch.long), max_new_tokens=5))) == 5  # 20: within
        assert not [w for w in caught if w.category is ContextLengthWarning]
        assert len(list(generate(model, torch.zeros(15, dtype=torch.long), max_new_tokens=6))) == 6
    past = [w for w in caught if w.category is ContextLengthWarning]
    assert len(past) == 1 and "past the 20 tokens" in str(past[0].message)  # once, not once per token
    cfg.trained_length = None  # unknown: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContextLengthWarning)
        list(generate(model, torch.zeros(15, dtype=torch.long), max_new_tokens=6))
