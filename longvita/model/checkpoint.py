"""Checkpoint I/O for Hugging Face-style folders (config.json + safetensors, sharded or not).

Three layouts load onto one module tree:
- ``transformers``: what ``InternVLForConditionalGeneration.save_pretrained`` writes
  (``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
  ``language_model.lm_head.*``; its in-memory names ``model.vision_tower.*``,
  ``model.language_model.*``, ``lm_head.*`` too) with a Qwen2 text config;
- ``long_vita``: Long-VITA's released layout (``model.vision_model.*`` with fused qkv,
  ``model.vision_projection.*``, ``model.layers.*``, ``lm_head``), vision config under ``visual``;
- ``internvl_chat``: InternVL's original layout (``vision_model.*``, ``mlp1.{0,1,3}``,
  ``language_model.*``).
The projector's width and biases are read from the weights, so both projector families load.
The preprocessing family (``LongVITAConfig.preprocess``) follows the layout: ``long_vita``
-> ``long-vita``; ``transformers`` and ``internvl_chat`` -> ``internvl``; a config.json
that records ``longvita_preprocess`` (``save_pretrained`` writes it) keeps its own.
``save_pretrained`` writes the transformers layout.
"""

from __future__ import annotations

import json
import os
import re
import stat

import torch

from longvita.common import LongVITAError
from longvita.files import OutputError, write_atomic
from longvita.model.config import PREPROCESS_FAMILIES, LongVITAConfig, ProjectorConfig, TextConfig, VisionConfig


class CheckpointError(LongVITAError, ValueError):
    """A checkpoint folder that is missing, corrupt, or does not match the model."""


# ------------------------------------------------------------------------------ configs


def _text_config(d: dict) -> TextConfig:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 1e6) if isinstance(rope, dict) else 1e6)
    return TextConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
        intermediate_size=d["intermediate_size"],
        rope_theta=float(theta),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        qkv_bias=d.get("attention_bias", True),  # Qwen2 configs omit it: q/k/v always have biases
        hidden_act=d.get("hidden_act", "silu"),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        head_dim=d.get("head_dim"),
    )


def _pair(x) -> int:
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


def _vision_config(d: dict, select_layer: int) -> VisionConfig:
    if d.get("use_qk_norm") or d.get("qk_normalization"):
        raise ValueError("vision encoders with QK normalisation (InternViT-6B) are not supported")
    if d.get("norm_type", "layer_norm") != "layer_norm":
        raise ValueError(f"vision norm_type {d.get('norm_type')!r} is not supported (only layer_norm)")
    return VisionConfig(
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        image_size=_pair(d.get("image_size", 448)),
        patch_size=_pair(d.get("patch_size", 14)),
        num_channels=d.get("num_channels", 3),
        qkv_bias=d.get("attention_bias", d.get("qkv_bias", True)),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6),
        hidden_act=d.get("hidden_act", "gelu"),
        select_layer=select_layer,
    )


def detect_layout(cfg: dict) -> str:
    """Which of the three layouts a config.json describes (ValueError if none)."""
    mt = cfg.get("model_type")
    if mt == "internvl":
        return "transformers"
    if mt == "long_vita" or "visual" in cfg:
        return "long_vita"
    if mt == "internvl_chat" or "llm_config" in cfg:
        return "internvl_chat"
    raise ValueError(f"unknown model_type {mt!r} (expected internvl, long_vita or internvl_chat)")


def _section(cfg: dict, key: str) -> dict:
    value = cfg[key]
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def config_from_dict(cfg: dict, layout: str) -> LongVITAConfig:
    """Model config from a checkpoint's config.json (projector shape filled in later from weights)."""
    if layout == "transformers":
        text = _text_config(_section(cfg, "text_config"))
        layer = cfg.get("vision_feature_layer", -1)
        vision = _vision_config(_section(cfg, "vision_config"), layer)
        tie = cfg.get("tie_word_embeddings", cfg["text_config"].get("tie_word_embeddings", False))
        scale = cfg.get("downsample_ratio", 0.5)
        ids = (cfg["image_token_id"],) if "image_token_id" in cfg else ()
        ids = tuple(cfg.get("longvita_image_token_ids", ids))
    elif layout == "long_vita":
        text = _text_config(cfg)
        vis = _section(cfg, "visual")
        vision = _vision_config(vis, vis.get("select_layer", cfg.get("select_layer", -1)))
        tie = cfg.get("tie_word_embeddings", False)
        scale = vis.get("downsample_ratio", cfg.get("downsample_ratio", 0.5))
        ids = ()
    else:
        text = _text_config(_section(cfg, "llm_config"))
        vision = _vision_config(_section(cfg, "vision_config"), cfg.get("select_layer", -1))
        tie = cfg["llm_config"].get("tie_word_embeddings", False)
        scale = cfg.get("downsample_ratio", 0.5)
        ids = ()
    # transformers' InternVL config names the projector's activation; the other layouts' is GELU
    act = cfg.get("projector_hidden_act", "gelu") if layout == "transformers" else "gelu"
    proj = ProjectorConfig(scale_factor=scale, layer_norm_eps=cfg.get("projector_layer_norm_eps", 1e-5), hidden_act=act)
    # each family's checkpoints were trained on its own pixels and token layout
    preprocess = cfg.get("longvita_preprocess", _LAYOUT_PREPROCESS[layout])
    if preprocess not in PREPROCESS_FAMILIES:
        raise CheckpointError(f"config.json: longvita_preprocess must be one of {list(PREPROCESS_FAMILIES)}, got {preprocess!r}")
    # what longvita's trainer recorded (absent in older folders and other tools' ones: unknown)
    trained = cfg.get("longvita_trained_length")
    return LongVITAConfig(vision=vision, projector=proj, text=text, tie_word_embeddings=bool(tie), image_token_ids=ids,
                          preprocess=preprocess, trained_length=trained)


_LAYOUT_PREPROCESS = {"long_vita": "long-vita", "transformers": "internvl", "internvl_chat": "internvl"}


# ------------------------------------------------------------------------------ key maps

# (pattern on the checkpoint name, replacement in our module tree), first match wins
_RULES = {
    "transformers": [
        (r"^(?:model\.)?vision_tower\.embeddings\.cls_token$", "vision.cls_token"),
        (r"^(?:model\.)?vision_tower\.embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"vision.patch_embed.\1"),
        (r"^(?:model\.)?vision_tower\.embeddings\.position_embeddings$", "vision.pos_embed"),
        (r"^(?:model\.)?vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", r"vision.layers.\1.attn.\2_proj.\3"),
        (r"^(?:model\.)?vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.(weight|bias)$", r"vision.layers.\1.attn.proj.\2"),
        (r"^(?:model\.)?vision_tower\.encoder\.layer\.(\d+)\.lambda_1$", r"vision.layers.\1.ls1"),
        (r"^(?:model\.)?vision_tower\.encoder\.layer\.(\d+)\.lambda_2$", r"vision.layers.\1.ls2"),
        (r"^(?:model\.)?vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)$", r"vision.layers.\1.norm1.\2"),
        (r"^(?:model\.)?vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)$", r"vision.layers.\1.norm2.\2"),
        (r"^(?:model\.)?vision_tower\.encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"vision.layers.\1.mlp.\2.\3"),
        (r"^(?:model\.)?multi_modal_projector\.layer_norm\.(weight|bias)$", r"projector.norm.\1"),
        (r"^(?:model\.)?multi_modal_projector\.linear_1\.(weight|bias)$", r"projector.fc1.\1"),
        (r"^(?:model\.)?multi_modal_projector\.linear_2\.(weight|bias)$", r"projector.fc2.\1"),
        (r"^language_model\.model\.(.+)$", r"text.\1"),
        (r"^model\.language_model\.(.+)$", r"text.\1"),
        (r"^(?:language_model\.)?lm_head\.weight$", "lm_head.weight"),
    ],
    "long_vita": [
        (r"^model\.vision_model\.embeddings\.class_embedding$", "vision.cls_token"),
        (r"^model\.vision_model\.embeddings\.patch_embedding\.(weight|bias)$", r"vision.patch_embed.\1"),
        (r"^model\.vision_model\.embeddings\.position_embedding$", "vision.pos_embed"),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", r"vision.layers.\1.attn.qkv.\2"),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.(attn\.proj|mlp\.fc[12]|norm[12])\.(weight|bias)$", r"vision.layers.\1.\2.\3"),
        (r"^model\.vision_model\.encoder\.layers\.(\d+)\.(ls[12])$", r"vision.layers.\1.\2"),
        (r"^model\.vision_projection\.pre_proj_layernorm\.(weight|bias)$", r"projector.norm.\1"),
        (r"^model\.vision_projection\.mlp\.0\.(weight|bias)$", r"projector.fc1.\1"),
        (r"^model\.vision_projection\.mlp\.2\.(weight|bias)$", r"projector.fc2.\1"),
        (r"^model\.(embed_tokens\..+|layers\..+|norm\..+)$", r"text.\1"),
        (r"^lm_head\.weight$", "lm_head.weight"),
    ],
    "internvl_chat": [
        (r"^vision_model\.embeddings\.class_embedding$", "vision.cls_token"),
        (r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$", r"vision.patch_embed.\1"),
        (r"^vision_model\.embeddings\.position_embedding$", "vision.pos_embed"),
        (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", r"vision.layers.\1.attn.qkv.\2"),
        (r"^vision_model\.encoder\.layers\.(\d+)\.(attn\.proj|mlp\.fc[12]|norm[12])\.(weight|bias)$", r"vision.layers.\1.\2.\3"),
        (r"^vision_model\.encoder\.layers\.(\d+)\.(ls[12])$", r"vision.layers.\1.\2"),
        (r"^mlp1\.0\.(weight|bias)$", r"projector.norm.\1"),
        (r"^mlp1\.1\.(weight|bias)$", r"projector.fc1.\1"),
        (r"^mlp1\.3\.(weight|bias)$", r"projector.fc2.\1"),
        (r"^language_model\.model\.(.+)$", r"text.\1"),
        (r"^language_model\.lm_head\.weight$", "lm_head.weight"),
    ],
}


def map_state_dict(raw: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename checkpoint keys onto longvita's module tree; split fused qkv. Returns (mapped, unknown)."""
    rules = [(re.compile(p), r) for p, r in _RULES[layout]]
    out, unknown = {}, []
    for name, tensor in raw.items():
        for pattern, repl in rules:
            if pattern.match(name):
                new = pattern.sub(repl, name)
                break
        else:
            unknown.append(name)
            continue
        if ".attn.qkv." in new:  # fused [Q; K; V] rows
            q, k, v = tensor.chunk(3, dim=0)
            for part, t in zip("qkv", (q, k, v)):
                out[new.replace(".attn.qkv.", f".attn.{part}_proj.")] = t
        else:
            out[new] = tensor
    return out, unknown


# ------------------------------------------------------------------------------ reading


def _read_json(path: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}")
    return data


def _shard_paths(folder: str, index: str) -> list[str]:
    """The shard files an index names, each checked to be a regular file inside ``folder``
    (an index is data from the checkpoint's author: '../x', an absolute path or a link out
    of the folder would read another file, and a FIFO would block the load forever)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> shard file name")
    root = os.path.realpath(folder)
    files = []
    for name in sorted(set(weight_map.values())):
        path = os.path.realpath(os.path.join(root, name))
        if os.path.isabs(name) or os.path.commonpath([root, path]) != root:
            raise CheckpointError(f"{index}: shard {name!r} lies outside the checkpoint folder")
        if not os.path.lexists(path):
            raise CheckpointError(f"{os.path.join(folder, name)}: shard named in the index is missing")
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CheckpointError(f"{index}: shard {name!r} is not a regular file")
        files.append(path)
    return files


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.lexists(single):
        if not os.path.isfile(single):
            raise CheckpointError(f"{single}: not a regular file")
        files = [single]
    elif os.path.exists(index):
        files = _shard_paths(folder, index)
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    from tqdm.auto import tqdm

    state = {}
    for f in tqdm(files, desc=f"loading {os.path.basename(os.path.abspath(folder))}", unit="shard", disable=len(files) < 2):
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{f}: corrupt safetensors file ({exc})") from None
    return state


def _summary(keys: list[str], most: int = 4) -> str:
    """A long list of keys in one short line: the count and the first few."""
    shown = ", ".join(keys[:most])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > most else ''})"


def read_config(folder: str) -> LongVITAConfig:
    """The validated model config of a checkpoint folder, without reading its weights (the
    projector's width and biases, which the weights decide, keep their defaults)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    config_path = os.path.join(folder, "config.json")
    raw_cfg = _read_json(config_path)
    try:
        return config_from_dict(raw_cfg, detect_layout(raw_cfg)).validate()
    except KeyError as exc:
        raise CheckpointError(f"{config_path}: missing field {exc}") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None


def load_pretrained(cls, folder: str, dtype: torch.dtype | None = None, device="cpu"):
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    config_path = os.path.join(folder, "config.json")
    raw_cfg = _read_json(config_path)
    # every problem with config.json names the file with its folder: a user with several
    # checkpoints must see which one is wrong; it is validated before any weight is read
    try:
        layout = detect_layout(raw_cfg)
        config = config_from_dict(raw_cfg, layout).validate()
    except KeyError as exc:
        raise CheckpointError(f"{config_path}: missing field {exc}") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    state, unknown = map_state_dict(read_safetensors(folder), layout)

    # the projector's width and biases are whatever the weights say (Long-VITA vs InternVL)
    if "projector.fc1.weight" in state:
        config.projector.intermediate_size = state["projector.fc1.weight"].shape[0]
        config.projector.bias = "projector.fc1.bias" in state
    if "lm_head.weight" not in state and "text.embed_tokens.weight" in state:
        config.tie_word_embeddings = True
    try:
        config.validate()
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None

    with torch.device("meta"):
        model = cls(config)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(unknown + [k for k in state if k not in expected])
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_summary(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_summary(mismatched)}")
        raise CheckpointError(f"{folder} ({layout} layout) does not match the model: " + "; ".join(parts))
    target = dtype or next(iter(state.values())).dtype
    state = {k: v.to(device=device, dtype=target if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.text.embed_tokens.weight
    return model.eval()


# ------------------------------------------------------------------------------ writing

_SAVE_RULES = [
    (r"^vision\.cls_token$", "vision_tower.embeddings.cls_token"),
    (r"^vision\.patch_embed\.(weight|bias)$", r"vision_tower.embeddings.patch_embeddings.projection.\1"),
    (r"^vision\.pos_embed$", "vision_tower.embeddings.position_embeddings"),
    (r"^vision\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$", r"vision_tower.encoder.layer.\1.attention.\2_proj.\3"),
    (r"^vision\.layers\.(\d+)\.attn\.proj\.(weight|bias)$", r"vision_tower.encoder.layer.\1.attention.projection_layer.\2"),
    (r"^vision\.layers\.(\d+)\.ls1$", r"vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision\.layers\.(\d+)\.ls2$", r"vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision\.layers\.(\d+)\.norm1\.(weight|bias)$", r"vision_tower.encoder.layer.\1.layernorm_before.\2"),
    (r"^vision\.layers\.(\d+)\.norm2\.(weight|bias)$", r"vision_tower.encoder.layer.\1.layernorm_after.\2"),
    (r"^vision\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"vision_tower.encoder.layer.\1.mlp.\2.\3"),
    (r"^projector\.norm\.(weight|bias)$", r"multi_modal_projector.layer_norm.\1"),
    (r"^projector\.fc1\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
    (r"^projector\.fc2\.(weight|bias)$", r"multi_modal_projector.linear_2.\1"),
    (r"^text\.(.+)$", r"language_model.model.\1"),
    (r"^lm_head\.weight$", "language_model.lm_head.weight"),
]


def to_transformers_config(config: LongVITAConfig) -> dict:
    v, p, t = config.vision, config.projector, config.text
    cfg = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": p.scale_factor,
        "projector_hidden_act": p.hidden_act,
        "vision_feature_layer": v.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": config.tie_word_embeddings,
        "image_seq_length": config.tokens_per_tile,
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "num_channels": v.num_channels,
            "attention_bias": v.qkv_bias,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": v.hidden_act,
            "norm_type": "layer_norm",
            "use_mean_pooling": True,
            "use_qk_norm": False,
        },
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "intermediate_size": t.intermediate_size,
            "rms_norm_eps": t.rms_norm_eps,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "head_dim": t.head_dim,
            "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": config.tie_word_embeddings,
        },
        # longvita-only fields: transformers ignores them; the projector's shape is read
        # back from the weights, the placeholder ids from here
        "longvita_image_token_ids": list(config.image_token_ids),
        "projector_layer_norm_eps": p.layer_norm_eps,
        "longvita_preprocess": config.preprocess,  # so a round trip keeps the family
    }
    if config.trained_length is not None:  # unknown stays absent, as in a folder from elsewhere
        cfg["longvita_trained_length"] = config.trained_length
    if config.image_token_ids:
        cfg["image_token_id"] = config.image_token_ids[0]
    return cfg


def _dump_json(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


# transformers' default shard size ("5GB"), so a folder we write shards like one it writes
MAX_SHARD_BYTES = 5 * 2**30


def save_pretrained(model, folder: str, max_shard_bytes: int = MAX_SHARD_BYTES, tokenizer=None) -> None:
    """config.json + model.safetensors (or shards + index) in transformers' InternVL layout,
    and ``tokenizer.json`` when a ``tokenizers.Tokenizer`` is given (a folder without it
    cannot be used by ``longvita generate --model``).

    Files are written to temporaries and renamed, so an interrupted save never leaves a
    half-written checkpoint over a good one.
    """
    from safetensors.torch import save_file

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"save_pretrained({folder!r}): cannot create the folder ({exc.strerror or exc})") from None
    rules = [(re.compile(p), r) for p, r in _SAVE_RULES]
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        for pattern, repl in rules:
            if pattern.match(name):
                tensors[pattern.sub(repl, name)] = t.detach().contiguous().cpu()
                break
        else:  # pragma: no cover - every parameter has a rule
            raise RuntimeError(f"no save rule for parameter {name}")
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)

    def _write(obj_path, writer):  # whole or not at all, with a plain file's permissions
        write_atomic(obj_path, lambda tmp: writer(str(tmp)), what=f"save_pretrained({folder!r})")

    if len(shards) == 1:
        _write(os.path.join(folder, "model.safetensors"), lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write(os.path.join(folder, fname), lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write(os.path.join(folder, "model.safetensors.index.json"), lambda p: _dump_json(index, p))
    if tokenizer is not None:
        _write(os.path.join(folder, "tokenizer.json"), lambda p: tokenizer.save(p))
    cfg = to_transformers_config(model.config)
    cfg["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    _write(os.path.join(folder, "config.json"), lambda p: _dump_json(cfg, p))
