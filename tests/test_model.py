"""The model against the real peer: tiny random transformers InternVL models, saved by
transformers, loaded by longvita; logits must agree in fp32 (relative error < 1e-5)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from longvita.model import CheckpointError, LongVITA, preset
from longvita.model.checkpoint import read_safetensors
from longvita.runtime import generate

from _model import logits
from _model import loss as fused_loss

# only the tests that compare with the peer need transformers: the KV-cache, packing,
# preset and loss tests run without it
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers (the peer model)"
)

IMAGE_TOKEN = 250
TOKENS_PER_TILE = 4  # 56-px tiles, 14-px patches, pixel shuffle 0.5


def _hf_model(kv_heads: int, tied: bool, vision_layers: int = 2):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=vision_layers, num_attention_heads=2, intermediate_size=48,
            image_size=56, patch_size=14, attention_bias=True, layer_scale_init_value=0.1,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=kv_heads, intermediate_size=80, vocab_size=256, rope_theta=1e6,
            tie_word_embeddings=tied, max_position_embeddings=4096,
        ),
        image_token_id=IMAGE_TOKEN, image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(cfg).eval()
    # random init leaves layer scales, cls and positions at constants: randomise everything
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 and "norm" in _name_of(model, p) else 0.0))
    return model


def _name_of(model, param):
    for n, p in model.named_parameters():
        if p is param:
            return n
    return ""


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _prompt(n_images: int, text_len: int = 9) -> torch.Tensor:
    ids = torch.randint(0, IMAGE_TOKEN, (text_len,)).tolist()
    for _ in range(n_images):
        ids += [IMAGE_TOKEN] * TOKENS_PER_TILE + torch.randint(0, IMAGE_TOKEN, (3,)).tolist()
    return torch.tensor(ids)


@needs_transformers
@pytest.mark.parametrize("kv_heads,tied", [(2, False), (4, True), (1, True), (4, False)])
def test_logits_match_transformers(tmp_path, kv_heads, tied):
    hf = _hf_model(kv_heads, tied)
    hf.save_pretrained(tmp_path)
    ours = LongVITA.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert ours.config.tie_word_embeddings == tied
    assert ours.config.image_token_ids == (IMAGE_TOKEN,)

    # text only
    ids = _prompt(0, 17)
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        got = logits(ours, ids)
    assert got.shape == ref.shape
    assert _rel_err(got, ref) < 1e-5

    # image + text: two tiles, placeholders interleaved with text
    ids = _prompt(2)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=pixels).logits[0]
        got = logits(ours, ids, pixels)
    assert _rel_err(got, ref) < 1e-5

    # logits_index picks rows; equal to the full logits' rows
    index = torch.tensor([0, ids.numel() - 1, 5])
    with torch.no_grad():
        rows = logits(ours, ids, pixels, index=index)
    assert _rel_err(rows, got[index]) < 1e-6


def test_packed_equals_separate(tmp_path):
    """Two samples packed with cu_seqlens give each sample's own logits (no cross-talk)."""
    model = LongVITA(preset("tiny")).eval()
    a = torch.randint(0, 500, (13,))
    b = torch.randint(0, 500, (7,))
    cu = torch.tensor([0, 13, 20], dtype=torch.int32)
    with torch.no_grad():
        packed = logits(model, torch.cat([a, b]), cu_seqlens=cu)
        sep = torch.cat([logits(model, a), logits(model, b)])
    assert _rel_err(packed, sep) < 1e-5


def test_kv_cache_decode_equals_full_forward():
    model = LongVITA(preset("tiny")).eval()
    ids = torch.randint(0, 500, (11,))
    new = list(generate(model, ids, max_new_tokens=6))
    assert len(new) == 6
    # greedy tokens re-derived by full forwards (no cache) must agree
    seq = ids.tolist()
    with torch.no_grad():
        for tok in new:
            row = logits(model, torch.tensor(seq))[-1]
            assert int(row.argmax()) == tok
            seq.append(tok)


@needs_transformers
def test_save_load_roundtrip_and_transformers_reads_it(tmp_path):
    from transformers import InternVLForConditionalGeneration

    hf = _hf_model(2, False)
    hf.save_pretrained(tmp_path / "a")
    ours = LongVITA.from_pretrained(str(tmp_path / "a"))
    ours.save_pretrained(str(tmp_path / "b"), max_shard_bytes=40_000)  # forces shards + index
    assert os.path.exists(tmp_path / "b" / "model.safetensors.index.json")
    again = LongVITA.from_pretrained(str(tmp_path / "b"))
    hf2 = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "b")).eval()
    ids = _prompt(1)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=pixels).logits[0]
        assert _rel_err(logits(again, ids, pixels), ref) < 1e-5
        assert _rel_err(hf2(input_ids=ids[None], pixel_values=pixels).logits[0], ref) < 1e-5


def _to_long_vita_layout(folder_in, folder_out, internvl_chat=False):
    """Rewrite a transformers checkpoint in Long-VITA's released layout (or InternVL's original)."""
    from safetensors.torch import save_file

    raw = read_safetensors(str(folder_in))
    cfg = json.load(open(os.path.join(folder_in, "config.json")))
    vp = "vision_model." if internvl_chat else "model.vision_model."
    out = {}
    n_layers = cfg["vision_config"]["num_hidden_layers"]
    for i in range(n_layers):
        src = f"vision_tower.encoder.layer.{i}."
        dst = f"{vp}encoder.layers.{i}."
        for wb in ("weight", "bias"):
            out[dst + f"attn.qkv.{wb}"] = torch.cat([raw[src + f"attention.{p}_proj.{wb}"] for p in "qkv"])
            out[dst + f"attn.proj.{wb}"] = raw[src + f"attention.projection_layer.{wb}"]
            out[dst + f"mlp.fc1.{wb}"] = raw[src + f"mlp.fc1.{wb}"]
            out[dst + f"mlp.fc2.{wb}"] = raw[src + f"mlp.fc2.{wb}"]
            out[dst + f"norm1.{wb}"] = raw[src + f"layernorm_before.{wb}"]
            out[dst + f"norm2.{wb}"] = raw[src + f"layernorm_after.{wb}"]
        out[dst + "ls1"] = raw[src + "lambda_1"]
        out[dst + "ls2"] = raw[src + "lambda_2"]
    out[vp + "embeddings.class_embedding"] = raw["vision_tower.embeddings.cls_token"]
    out[vp + "embeddings.position_embedding"] = raw["vision_tower.embeddings.position_embeddings"]
    for wb in ("weight", "bias"):
        out[vp + f"embeddings.patch_embedding.{wb}"] = raw[f"vision_tower.embeddings.patch_embeddings.projection.{wb}"]
    proj = ("mlp1.0", "mlp1.1", "mlp1.3") if internvl_chat else (
        "model.vision_projection.pre_proj_layernorm", "model.vision_projection.mlp.0", "model.vision_projection.mlp.2")
    for name, src in zip(proj, ("layer_norm", "linear_1", "linear_2")):
        for wb in ("weight", "bias"):
            out[f"{name}.{wb}"] = raw[f"multi_modal_projector.{src}.{wb}"]
    for k, v in raw.items():
        if k.startswith("language_model."):
            if internvl_chat:
                out[k] = v
            else:
                out[k.replace("language_model.model.", "model.").replace("language_model.lm_head", "lm_head")] = v
    os.makedirs(folder_out, exist_ok=True)
    save_file(out, os.path.join(folder_out, "model.safetensors"))
    vis = dict(cfg["vision_config"], qkv_bias=True)
    vis.pop("attention_bias")
    if internvl_chat:
        new_cfg = {"model_type": "internvl_chat", "vision_config": vis, "llm_config": cfg["text_config"],
                   "downsample_ratio": 0.5, "select_layer": -1}
    else:
        text = dict(cfg["text_config"])
        text.pop("rope_parameters")
        new_cfg = dict(text, model_type="long_vita", visual=vis, rope_theta=1e6)
    json.dump(new_cfg, open(os.path.join(folder_out, "config.json"), "w"))


@needs_transformers
@pytest.mark.parametrize("internvl_chat", [False, True])
def test_long_vita_and_internvl_layouts_load(tmp_path, internvl_chat):
    hf = _hf_model(2, False)
    hf.save_pretrained(tmp_path / "hf")
    _to_long_vita_layout(tmp_path / "hf", tmp_path / "lv", internvl_chat)
    ours = LongVITA.from_pretrained(str(tmp_path / "lv"))
    ours.config.image_token_ids = (IMAGE_TOKEN,)  # these layouts take ids from the tokenizer
    ids = _prompt(1)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=pixels).logits[0]
        assert _rel_err(logits(ours, ids, pixels), ref) < 1e-5


@needs_transformers
def test_checkpoint_errors_list_every_problem(tmp_path):
    hf = _hf_model(2, False)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    raw = read_safetensors(str(tmp_path))
    raw.pop("language_model.model.norm.weight")
    raw["language_model.model.bogus"] = torch.zeros(1)
    raw["multi_modal_projector.linear_2.bias"] = torch.zeros(3)
    save_file(raw, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        LongVITA.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "text.norm.weight" in msg and "bogus" in msg and "projector.fc2.bias" in msg

    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        LongVITA.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="not found"):
        LongVITA.from_pretrained(str(tmp_path / "nope"))


def test_rope_theta_spellings(tmp_path):
    from longvita.model.checkpoint import _text_config

    base = dict(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    assert _text_config(dict(base, rope_theta=5e5)).rope_theta == 5e5
    assert _text_config(dict(base, rope_parameters={"rope_theta": 7e5})).rope_theta == 7e5


def test_long_vita_14b_preset_shapes():
    cfg = preset("long-vita-14b")
    with torch.device("meta"):
        model = LongVITA(cfg)
    assert model.projector.fc1.weight.shape == (1024, 4096) and model.projector.fc1.bias is None
    assert model.projector.fc2.weight.shape == (5120, 1024)
    assert model.text.layers[0].self_attn.k_proj.weight.shape == (1024, 5120)
    assert cfg.tokens_per_tile == 256
    n_params = sum(p.numel() for p in model.parameters())
    assert 14.0e9 < n_params < 15.5e9


def test_loss_equals_cross_entropy_of_full_logits():
    """LongVITA.loss (fused, logits never materialised) == F.cross_entropy on full logits, with grads."""
    import torch.nn.functional as F

    model = LongVITA(preset("tiny")).double()
    ids = torch.randint(0, 500, (23,))
    labels = torch.randint(0, 500, (23,))
    labels[torch.rand(23) < 0.4] = -100
    cu = torch.tensor([0, 10, 23], dtype=torch.int32)
    loss = fused_loss(model, ids, labels, cu_seqlens=cu)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    assert sum(g is not None for g in grads) > 10
    model.zero_grad()
    ref = F.cross_entropy(logits(model, ids, cu_seqlens=cu), labels, ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-10
    for g, p in zip(grads, model.parameters()):
        assert (g is None) == (p.grad is None)
        if g is not None:
            assert torch.allclose(g, p.grad, rtol=1e-8, atol=1e-12)


def test_checkpoint_layout_picks_preprocessing_family(tmp_path):
    """Each layout's checkpoints were trained on their own family's pixels and token
    layout: loading picks it without flags; config.json can say otherwise; our own save
    keeps the family through a round trip."""
    hf = _hf_model(2, False)
    hf.save_pretrained(tmp_path / "hf")
    assert LongVITA.from_pretrained(str(tmp_path / "hf")).config.preprocess == "internvl"
    _to_long_vita_layout(tmp_path / "hf", tmp_path / "lv")
    assert LongVITA.from_pretrained(str(tmp_path / "lv")).config.preprocess == "long-vita"
    _to_long_vita_layout(tmp_path / "hf", tmp_path / "chat", internvl_chat=True)
    assert LongVITA.from_pretrained(str(tmp_path / "chat")).config.preprocess == "internvl"

    # round trips through save_pretrained (transformers layout on disk) keep the family
    lv = LongVITA.from_pretrained(str(tmp_path / "lv"))
    lv.save_pretrained(str(tmp_path / "lv_saved"))
    assert json.load(open(tmp_path / "lv_saved" / "config.json"))["longvita_preprocess"] == "long-vita"
    assert LongVITA.from_pretrained(str(tmp_path / "lv_saved")).config.preprocess == "long-vita"
    LongVITA.from_pretrained(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "hf_saved"))
    assert LongVITA.from_pretrained(str(tmp_path / "hf_saved")).config.preprocess == "internvl"
    torch.manual_seed(0)
    LongVITA(preset("tiny")).save_pretrained(str(tmp_path / "tiny"))  # the embedded default: long-vita
    assert LongVITA.from_pretrained(str(tmp_path / "tiny")).config.preprocess == "long-vita"

    # an explicit record wins over the layout; an unknown name is a checkpoint error
    cfg_path = tmp_path / "chat" / "config.json"
    cfg = json.load(open(cfg_path))
    json.dump(dict(cfg, longvita_preprocess="long-vita"), open(cfg_path, "w"))
    assert LongVITA.from_pretrained(str(tmp_path / "chat")).config.preprocess == "long-vita"
    json.dump(dict(cfg, longvita_preprocess="llava"), open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="longvita_preprocess.*llava"):
        LongVITA.from_pretrained(str(tmp_path / "chat"))
