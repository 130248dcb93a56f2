"""longvita inside transformers (``longvita.integrations.transformers``), against transformers
itself on tiny random models built here (nothing downloads):

- the attention implementation ``"longvita"`` equals SDPA with an explicit mask in float64
  (block-diagonal for packed batches of either collator style, padding, sliding windows), and
  ``generate()`` gives the tokens the unpatched model gives. The reference is SDPA, not
  ``eager``: transformers' eager attention takes its softmax in float32 whatever the dtype
  (``softmax(dtype=torch.float32)``), so it is no float64 reference; SDPA's math is float64;
- ``apply_longvita``: loss and every gradient equal the unpatched model's (float64; the
  reference loss is computed from its logits in float64, since transformers' own loss casts
  logits to float32), and an HF ``Trainer`` with ``DataCollatorWithFlattening`` takes the
  same steps with and without it;
- context parallelism on 2 and 3 gloo ranks (and FSDP2) equals one process;
- ``torch.compile`` of the patched model runs, and the README's examples run.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub
transformers = pytest.importorskip("transformers")

from _dist import run_on_ranks  # noqa: E402

from longvita.integrations.transformers import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    apply_longvita,
    context_parallel,
    shard_batch,
)

VOCAB = 97
IMAGE_TOKEN = 90
TOKENS_PER_TILE = 4  # 28-px tiles, 7-px patches, pixel shuffle 0.5


# --------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------


def _config(family: str, heads: int = 4, kv_heads: int = 2, window: int | None = None, layers: int = 2):
    common = dict(hidden_size=8 * heads, head_dim=8, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                  max_position_embeddings=256, rope_theta=1e4, use_cache=False, tie_word_embeddings=False)
    if family == "qwen2":  # layer 0 full attention, layer 1 sliding when a window is set
        return transformers.Qwen2Config(**common, use_sliding_window=window is not None,
                                        sliding_window=window, max_window_layers=1)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":  # every layer sliding
        return transformers.MistralConfig(**common, sliding_window=window)
    raise ValueError(family)


def _randomise(model, scale=0.2):
    """Random weights large enough that attention is far from uniform (a wrong mask shows)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if p.dim() == 1 and "norm" in name else 0.0))
    return model


def _causal_lm(family, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[family]
    model = _randomise(cls(_config(family, **kw))).to(dtype)
    model.set_attn_implementation("sdpa")
    return model


def _internvl(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                           image_size=28, patch_size=7, attention_bias=True, layer_scale_init_value=0.1),
        text_config=dict(model_type="qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB, rope_theta=1e4,
                         max_position_embeddings=256, tie_word_embeddings=False, use_cache=False),
        image_token_id=IMAGE_TOKEN, image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=False,
    )
    model = _randomise(transformers.InternVLForConditionalGeneration(cfg), 0.1).to(dtype)
    model.set_attn_implementation("sdpa")
    return model


def _patched(model, **kw):
    """A patched copy (the reference stays as it is)."""
    return apply_longvita(copy.deepcopy(model), **kw)


# --------------------------------------------------------------------------------------
# batches and references
# --------------------------------------------------------------------------------------


def _packed(lengths, flash_kwargs: bool, seed=0):
    """A DataCollatorWithFlattening batch of random documents of these lengths."""
    g = torch.Generator().manual_seed(seed)
    feats = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()} for n in lengths]
    return transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(feats)


def _block_diagonal(lengths, window: int | None = None) -> torch.Tensor:
    """(1, 1, T, T) bool: causal within each document (and within ``window`` keys)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(doc.numel())
    visible = (doc[:, None] == doc[None]) & (pos[:, None] >= pos[None])
    if window is not None:
        visible &= pos[:, None] - pos[None] < window
    return visible[None, None]


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_equal(got: dict, want: dict, rtol=1e-9):
    assert got.keys() == want.keys(), set(got) ^ set(want)
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:  # relative to the model's largest gradient: some are zero analytically
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale, msg=name)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _reference_loss(logits, labels, num_items=None, ignore_index=-100):
    """transformers' ForCausalLMLoss (shift per row) in the logits' own dtype."""
    target = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                           reduction="sum" if num_items is not None else "mean")
    return loss / num_items if num_items is not None else loss


# --------------------------------------------------------------------------------------
# the attention implementation
# --------------------------------------------------------------------------------------


def test_registered_on_import_and_loads_by_name(tmp_path):
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM

    assert ATTN_IMPLEMENTATION == "longvita"
    assert "longvita" in AttentionInterface._global_mapping and "longvita" in AttentionMaskInterface._global_mapping
    ref = _causal_lm("qwen2", torch.float32)
    ref.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="longvita", dtype=torch.float64)
    assert loaded.config._attn_implementation == "longvita"
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert _rel(loaded(input_ids=ids).logits, ref.double()(input_ids=ids).logits) < 1e-12


@pytest.mark.parametrize("family,heads,kv_heads,style", [
    ("qwen2", 5, 1, "position_ids"),        # GQA 5:1, DataCollatorWithFlattening's default
    ("qwen2", 5, 1, "flash_kwargs"),        # cu_seq_lens_q/k + max_length_q/k
    ("llama", 4, 4, "flash_kwargs"),        # MHA
    ("qwen3", 4, 2, "position_ids+cache"),  # use_cache=True: a fresh cache changes nothing
])
def test_packed_batch_equals_block_diagonal_sdpa(family, heads, kv_heads, style):
    lengths = [1, 7, 13, 2, 5]  # 1, primes, not multiples of any block
    ref = _causal_lm(family, heads=heads, kv_heads=kv_heads)
    ours = _patched(ref)
    batch = _packed(lengths, flash_kwargs=style == "flash_kwargs")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if style.endswith("cache"):
        inputs["use_cache"] = True
    upstream = torch.randn(1, sum(lengths), VOCAB, dtype=torch.float64)

    want = ref(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
               attention_mask=_block_diagonal(lengths)).logits
    (want * upstream).sum().backward()
    got = ours(**inputs).logits
    (got * upstream).sum().backward()
    assert _rel(got, want) < 1e-12
    _assert_grads_equal(_grads(ours), _grads(ref))
    with torch.no_grad():  # control: attention across the documents is far off, so the probe can fail
        assert _rel(ref(input_ids=batch["input_ids"]).logits, want) > 1e-2


def test_sliding_window_packed_equals_sdpa():
    """Qwen2 with layer 0 full and layer 1 sliding (window 4 < the documents)."""
    lengths, window = [9, 3, 12], 4
    ref = _causal_lm("qwen2", window=window)
    ours = _patched(ref)
    batch = _packed(lengths, flash_kwargs=False)
    masks = {"full_attention": _block_diagonal(lengths), "sliding_attention": _block_diagonal(lengths, window)}
    upstream = torch.randn(1, sum(lengths), VOCAB, dtype=torch.float64)
    want = ref(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=masks).logits
    (want * upstream).sum().backward()
    got = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    (got * upstream).sum().backward()
    assert _rel(got, want) < 1e-12
    _assert_grads_equal(_grads(ours), _grads(ref))
    with torch.no_grad():  # control: the window matters here
        masks["sliding_attention"] = masks["full_attention"]
        assert _rel(ref(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=masks).logits,
                    want) > 1e-2


@pytest.mark.parametrize("family,window", [("qwen2", None), ("mistral", 4)])
def test_padded_batch_equals_sdpa(family, window):
    """Left padding, right padding, none: the real rows' logits and the gradients of a loss on
    them equal transformers' SDPA with the same 2-D mask."""
    ref = _causal_lm(family, window=window)
    ours = _patched(ref)
    ids = torch.randint(0, VOCAB, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    upstream = torch.randn(3, 10, VOCAB, dtype=torch.float64) * mask[..., None]
    want = ref(input_ids=ids, attention_mask=mask).logits
    (want * upstream).sum().backward()
    got = ours(input_ids=ids, attention_mask=mask).logits
    (got * upstream).sum().backward()
    real = mask.bool()
    assert _rel(got[real], want[real]) < 1e-12
    _assert_grads_equal(_grads(ours), _grads(ref))


@pytest.mark.parametrize("family,window", [("qwen2", None), ("mistral", 5)])
def test_generate_gives_the_unpatched_models_tokens(family, window):
    """Greedy generate with transformers' own KV cache (a sliding one for Mistral: the prompt
    is longer than the window), a left-padded batch and a single prompt."""
    ref = _causal_lm(family, window=window).eval()
    ours = _patched(ref)
    prompt = torch.randint(1, VOCAB, (2, 9))  # 0 is the pad token: generate reads it as padding
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    want = ref.generate(prompt, attention_mask=mask, **options)
    assert torch.equal(ours.generate(prompt, attention_mask=mask, **options), want)
    want = ref.generate(prompt[1:], **options)
    assert torch.equal(ours.generate(prompt[1:], **options), want)


def test_cache_slots_past_the_mask_are_not_keys():
    """A static cache hands over all its slots with a mask as long as the tokens so far: the
    slots past the mask are no keys (flash-attention's rule); the rest is padded causal
    attention, bottom-right aligned (GQA 2:1, a left-padded row)."""
    from longvita.integrations.transformers import longvita_attention

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(2, 4, 3, 8, dtype=torch.float64)  # 3 new tokens ...
    k, v = (torch.randn(2, 2, 16, 8, dtype=torch.float64) for _ in range(2))  # ... a cache of 16 slots, 9 used
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :2] = False
    got, weights = longvita_attention(module, q, k, v, mask, scaling=0.3)
    assert weights is None and got.shape == (2, 3, 4, 8)
    pos = torch.arange(9)
    visible = mask[:, None, :] & (pos[None, None, :] <= pos[6:][None, :, None])  # (B, 3 queries, 9 keys)
    want = F.scaled_dot_product_attention(q, k[:, :, :9].repeat_interleave(2, 1), v[:, :, :9].repeat_interleave(2, 1),
                                          attn_mask=visible[:, None], scale=0.3)
    assert _rel(got, want.transpose(1, 2)) < 1e-12


def test_layout_is_built_once_per_forward(monkeypatch):
    """Every layer gets the same mask / position tensor: the layout (and its host sync) is
    made on the first of 3 layers and reused; a new or modified tensor makes a new one."""
    from longvita.integrations.transformers import attention

    built = []
    for name in ("_padding_layout", "_position_layout", "_offsets_layout"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _name=name: built.append(_name) or _real(*a))
    model = apply_longvita(_causal_lm("qwen2", layers=3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (2, 8)), attention_mask=mask)
        assert built == ["_padding_layout"]
        batch = _packed([3, 5], flash_kwargs=False)
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        assert built == ["_padding_layout", "_position_layout"]
        batch = _packed([3, 5], flash_kwargs=True)
        model(**{k: v for k, v in batch.items() if k != "labels"})
        assert built[2:] == ["_offsets_layout"]
        positions = batch["position_ids"]
        model(input_ids=batch["input_ids"], position_ids=positions)
        positions[0, 3:] = torch.arange(3, 8)  # in place: one document now, so a new layout
        out = model(input_ids=batch["input_ids"], position_ids=positions).logits
        assert built[3:] == ["_position_layout", "_position_layout"]
        whole = model(input_ids=batch["input_ids"]).logits  # positions 0..7 by default
        assert _rel(out, whole) < 1e-12


def test_bad_input_raises_clearly():
    model = apply_longvita(_causal_lm("qwen2"))
    ids = torch.randint(0, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="2-D .* padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k together"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 6], dtype=torch.int32))
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        model.train()(input_ids=ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_packed_logits_and_fused_loss_within_twice_sdpa_error():
    """On a GPU (Triton kernels), bf16: the packed batch's logits and the fused loss are at most
    2x (+ eps) as far from float64 SDPA as transformers' own bf16 SDPA model is."""
    lengths = [1, 127, 300, 64, 511]  # not multiples of any block size
    ref64 = _causal_lm("qwen2", torch.float64, heads=5, kv_heads=1).cuda()
    ref16 = copy.deepcopy(ref64).to(torch.bfloat16)
    attention_only = apply_longvita(copy.deepcopy(ref16), fused_loss=False)
    fused = apply_longvita(copy.deepcopy(ref16))
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _packed(lengths, True).items()}
    explicit = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    attention_mask=_block_diagonal(lengths).cuda())
    with torch.no_grad():
        want = ref64(**explicit)
        base = ref16(**explicit)  # transformers' loss: bf16 logits cast to fp32
        got_logits = attention_only(**batch).logits
        got_loss = fused(**batch).loss
    want_loss = _reference_loss(want.logits, batch["labels"]).item()

    def err(x):
        return (x.double() - want.logits).abs().max().item()

    assert err(got_logits) <= 2 * err(base.logits) + 1e-3, (err(got_logits), err(base.logits))
    assert abs(got_loss.item() - want_loss) <= 2 * abs(base.loss.item() - want_loss) + 1e-3


# --------------------------------------------------------------------------------------
# apply_longvita: the fused loss
# --------------------------------------------------------------------------------------


def _loss_case(family):
    """(reference model, inputs) of one training batch with ignored labels and padding."""
    if family == "internvl":
        ref = _internvl()
        ids = torch.cat([torch.randint(0, IMAGE_TOKEN, (5,)), torch.full((TOKENS_PER_TILE,), IMAGE_TOKEN),
                         torch.randint(0, IMAGE_TOKEN, (8,))])[None]
        labels = ids.clone()
        labels[0, :9] = -100  # the prompt and the image
        return ref, dict(input_ids=ids, labels=labels, pixel_values=torch.randn(1, 3, 28, 28, dtype=torch.float64))
    ref = _causal_lm(family)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    return ref, dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral", "internvl"])
@pytest.mark.parametrize("num_items", [None, 7])
def test_apply_longvita_loss_and_every_gradient_equal_the_unpatched_model(family, num_items):
    ref, inputs = _loss_case(family)
    ours = _patched(ref)
    assert ours.config._attn_implementation == "longvita"
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    out_ref = ref(**inputs, **extra)
    want = _reference_loss(out_ref.logits, inputs["labels"], num_items)
    want.backward()
    out = ours(**inputs, **extra)
    assert out.logits is None  # no logits were made
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - want.item()) <= 1e-12 * abs(want.item())
    out.loss.backward()
    _assert_grads_equal(_grads(ours), _grads(ref))
    # transformers' own loss (logits cast to fp32 first) agrees to fp32 rounding
    assert abs(out_ref.loss.item() - want.item()) <= 1e-5 * abs(want.item())


def test_fused_loss_options():
    """shift_labels (no shift), ignore_index, return_dict=False, and no labels = the class's forward."""
    ref, inputs = _loss_case("qwen2")
    ours = _patched(ref)
    labels = inputs.pop("labels")
    logits = ref(**inputs).logits
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        by_shift = ours(**inputs, labels=labels, shift_labels=shifted).loss
        assert abs(by_shift.item() - _reference_loss(logits, labels).item()) < 1e-12
        odd = labels.masked_fill(labels == -100, -1)
        loss = ours(**inputs, labels=odd, ignore_index=-1).loss
        assert abs(loss.item() - _reference_loss(logits, odd, ignore_index=-1).item()) < 1e-12
        as_tuple = ours(**inputs, labels=labels, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], ours(**inputs, labels=labels).loss)
        real = inputs["attention_mask"].bool()  # (padding rows: zeros here, whatever SDPA gives there)
        assert _rel(ours(**inputs).logits[real], logits[real]) < 1e-12


def test_a_deep_copy_of_a_patched_model_is_its_own_model():
    """copy.deepcopy (as TRL makes reference models) gives a model whose forward runs the
    copy's weights, patched as the original."""
    ref, inputs = _loss_case("qwen2")
    ours = apply_longvita(ref)
    clone = copy.deepcopy(ours)
    with torch.no_grad():
        clone.lm_head.weight.zero_()  # uniform predictions: loss log(V)
        assert abs(clone(**inputs).loss.item() - math.log(VOCAB)) < 1e-12
        assert clone(**inputs).logits is None and clone.config._attn_implementation == "longvita"
        assert ours(**inputs).loss.item() > math.log(VOCAB) + 0.1  # the original keeps its weights
        assert clone(input_ids=inputs["input_ids"]).logits.abs().max() == 0


def test_unsupported_class_raises_one_line():
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB)
    with pytest.raises(TypeError) as info:
        apply_longvita(transformers.GPT2LMHeadModel(cfg))
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "Qwen2ForCausalLM" in message and "\n" not in message


# --------------------------------------------------------------------------------------
# HF Trainer
# --------------------------------------------------------------------------------------


class _Samples(torch.utils.data.Dataset):
    def __init__(self, seed, n=16):
        g = torch.Generator().manual_seed(seed)
        self.items = [torch.randint(0, VOCAB, (int(torch.randint(3, 21, (), generator=g)),), generator=g).tolist()
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def _train(model, tmp_path, flash_kwargs: bool):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=1,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Samples(2), data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_hf_trainer_steps_equal_with_and_without_the_patch(tmp_path, flash_kwargs):
    """3 optimizer steps of 2 accumulated micro-batches each (Trainer passes
    num_items_in_batch), fp32: the same losses and weights patched and unpatched. The
    unpatched model is SDPA, which sees the documents through position_ids only without a
    cache, hence use_cache=False in the config (longvita's attention does not care)."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (in the test extra)")
    ref = _causal_lm("qwen2", torch.float32, heads=4, kv_heads=2)
    ours = _patched(ref)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    want_losses, want_params = _train(ref, tmp_path / "ref", flash_kwargs)
    got_losses, got_params = _train(ours, tmp_path / "ours", flash_kwargs)
    assert len(want_losses) == 3
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    for name in want_params:
        torch.testing.assert_close(got_params[name], want_params[name], rtol=1e-4, atol=1e-5, msg=name)
    assert all(not torch.equal(start[n], want_params[n]) for n in start)  # the steps did move every weight


# --------------------------------------------------------------------------------------
# context parallelism
# --------------------------------------------------------------------------------------

CP_LENGTHS = [5, 1, 17, 8, 2]  # no length a multiple of 2P for P = 2, 3


def _cp_batch(seed, padded: bool = False):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n in CP_LENGTHS:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [t if torch.rand((), generator=g) < 0.7 else -100 for t in ids]
        feats.append({"input_ids": ids, "labels": labels})
    return transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)


def _single_process(seed):
    """The reference: one process, the whole batch, loss from the logits in float64."""
    model = _causal_lm("qwen2", heads=5, kv_heads=1, seed=seed)
    batch = _cp_batch(seed)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=_block_diagonal(CP_LENGTHS)).logits
    loss = _reference_loss(logits, batch["labels"])
    loss.backward()
    return loss.item(), _grads(model)


def _cp_step(rank, world, seed, modes):
    """One training step per mode on this rank: its loss share and its gradients summed over the ranks."""
    import torch.distributed as dist

    from longvita.runtime.train.loss import all_reduce_gradients

    results = {}
    for mode in modes:
        model = _causal_lm("qwen2", heads=5, kv_heads=1, seed=seed)
        context_parallel(model, None, fused_loss=mode != "hf_loss")
        batch = shard_batch(_cp_batch(seed), None)
        if mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            loss = model(**batch).loss
            (loss * world).backward()  # FSDP2 averages the ranks' gradients; the shares need their sum
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        else:
            loss = model(**batch).loss
            loss.backward()
            all_reduce_gradients(model)
            grads = _grads(model)
        total = loss.detach().clone()
        dist.all_reduce(total)
        results[mode] = dict(loss=loss.item(), total=total.item(), grads=grads, rows=batch["input_ids"].shape[1])
    return results


@pytest.mark.parametrize("world,modes", [(2, ("fused", "hf_loss", "fsdp2")), (3, ("fused",))])
def test_context_parallel_step_equals_one_process(tmp_path, world, modes):
    """Documents of lengths 5, 1, 17, 8, 2 zigzag over P ranks: the ranks' losses add up to the
    one-process loss and their summed gradients are its gradients, in float64 -- with the
    fused loss, with transformers' own loss (shift_labels + num_items_in_batch), and under
    FSDP2 (every decoder layer and the root sharded)."""
    seed = int(torch.randint(0, 2**30, ()).item())
    per_rank = run_on_ranks(_cp_step, world, tmp_path, seed, modes, deadline_s=300)
    want_loss, want_grads = _single_process(seed)
    for mode in modes:
        results = [r[mode] for r in per_rank]
        # transformers' own loss casts the logits to float32 first: float32 rounding there
        rtol = 1e-5 if mode == "hf_loss" else 1e-12
        assert abs(sum(r["loss"] for r in results) - want_loss) <= rtol * abs(want_loss), mode
        assert all(abs(r["total"] - want_loss) <= rtol * abs(want_loss) for r in results), mode
        assert len({r["rows"] for r in results}) == 1  # zigzag: every rank holds as many rows
        assert all(r["loss"] != 0 for r in results)  # every rank holds labelled tokens
        for r in results:
            _assert_grads_equal(r["grads"], want_grads, rtol=max(rtol, 1e-9))


def test_shard_batch_rows_and_refusals():
    """One process (P = 1): shard_batch keeps every real token once, with global positions and
    labels shifted before the cut; bad batches are refused naming what is wrong."""
    batch = _cp_batch(3)
    out = shard_batch(batch)
    shard = out["longvita_cp"]
    valid = shard.valid
    assert torch.equal(out["input_ids"][0][valid], batch["input_ids"][0])
    assert torch.equal(out["position_ids"][0][valid], batch["position_ids"][0])
    want_shift = F.pad(batch["labels"][0, 1:], (0, 1), value=-100)
    assert torch.equal(out["shift_labels"][0][valid], want_shift)
    assert int(out["num_items_in_batch"]) == int((want_shift != -100).sum())
    assert out["use_cache"] is False and "cu_seq_lens_q" not in out
    assert shard.layout.doc_lengths.tolist() == CP_LENGTHS
    with pytest.raises(ValueError, match="per-token tensor"):
        shard_batch({**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])})
    model = context_parallel(_causal_lm("qwen2"))
    with torch.no_grad():
        assert torch.isfinite(model(**out).loss)
    with pytest.raises(ValueError, match="longvita"):  # ... an SDPA model refuses them
        apply_longvita(_causal_lm("qwen2"), attention=False)(**out)


def test_internvl_context_parallel_through_inputs_embeds():
    """InternVL under context parallelism: the images are placed into inputs_embeds (every
    rank encodes them), shard_batch cuts the embeddings; one process (P = 1, the ring of one
    rank) gives the unsharded loss and gradients, vision tower included. pixel_values in a
    sharded batch are refused (a shard cuts through images)."""
    ref, inputs = _loss_case("internvl")
    ours = _patched(ref)
    want = ours(**inputs).loss
    want.backward()
    want_grads = _grads(ours)
    ours.zero_grad()

    model = context_parallel(ours)
    ids, labels, pixels = inputs["input_ids"], inputs["labels"], inputs["pixel_values"]
    embeds = model.get_input_embeddings()(ids)
    features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None].expand_as(embeds), features.to(embeds.dtype))
    local = shard_batch({"inputs_embeds": embeds, "labels": labels})
    got = model(**local).loss
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    _assert_grads_equal(_grads(model), want_grads)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(**shard_batch({"input_ids": ids, "labels": labels}), pixel_values=pixels)


# --------------------------------------------------------------------------------------
# torch.compile, import rules, README
# --------------------------------------------------------------------------------------


def test_torch_compile_of_the_patched_model_runs():
    ref = _causal_lm("qwen2", torch.float32)
    ours = _patched(ref)
    batch = _packed([3, 8, 5], flash_kwargs=True)
    eager = ours(**batch).loss
    compiled = torch.compile(ours, backend="aot_eager")  # traced, autograd split, no codegen (inductor: ~70 s here)
    loss = compiled(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - eager.item()) <= 1e-5 * abs(eager.item())
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_import_longvita_does_not_import_transformers():
    code = ("import sys, longvita, longvita.kernels, longvita.integrations, longvita.parallel, longvita.runtime\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr


def _readme_block(tag: str) -> str:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    return readme.split(f"<!-- example: {tag} -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def _user_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a user's shell
    return env


def test_readme_examples_run(tmp_path):
    """The README's attention and apply_longvita examples run as written."""
    for tag in ("hf-attention", "hf-apply"):
        script = tmp_path / f"{tag}.py"
        script.write_text(_readme_block(tag))
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_user_env(),
                           timeout=300, cwd=tempfile.gettempdir())
        assert r.returncode == 0, (tag, r.stderr[-3000:])
        assert "tensor(" in r.stdout, (tag, r.stdout)
    assert r.stdout.rstrip().endswith("None")  # apply_longvita: no logits


def test_readme_context_parallel_example_runs(tmp_path):
    """The README's context-parallel example runs under torchrun on 2 gloo ranks and prints the
    loss one process computes (SDPA without a cache, fp32)."""
    import re

    script = tmp_path / "example.py"
    script.write_text(_readme_block("hf-context-parallel"))
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, env=_user_env(), timeout=300, cwd=tempfile.gettempdir(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.search(r"2 ranks, (\d+) rows each, loss ([0-9.]+)", r.stdout)
    assert found is not None, r.stdout
    torch.manual_seed(0)  # the example's model and batch, in one process
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=1000)
    model = transformers.Qwen2ForCausalLM(config)
    batch = transformers.DataCollatorWithFlattening()([{"input_ids": list(range(1, n + 1))} for n in (50, 9, 31)])
    with torch.no_grad():
        want = model(**batch, use_cache=False).loss.item()  # (with a cache SDPA would see across documents)
    assert abs(float(found.group(2)) - want) <= 1e-5 * abs(want), (found.group(2), want)
    assert int(found.group(1)) == 2 * sum(-(-n // 4) for n in (50, 9, 31))  # every document padded to 2P chunks
