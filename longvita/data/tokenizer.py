"""Tokenizer loading, an in-code tokenizer for tests/demos, and special-token ids.

Real checkpoints ship a HuggingFace ``tokenizer.json`` (Qwen2.5's byte-level BPE plus
Long-VITA's added tokens); ``load_tokenizer`` reads it with the ``tokenizers`` library.
``build_default_tokenizer`` builds a tiny stand-in in code so nothing is downloaded:
byte-level BPE over the 256 byte symbols with no merges (every byte is one token) plus
the special tokens below. Special-token ids are always looked up by string, never
hard-coded, so both tokenizers work with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from longvita.data.errors import InputError

__all__ = ["SPECIAL_TOKENS", "SpecialTokens", "build_default_tokenizer", "load_tokenizer"]

# Order fixes the ids of the in-code tokenizer (256.. onwards); the real tokenizer has
# its own ids for the same strings.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<patch>",
    "</patch>",
    "<PATCH_CONTEXT>",
    "<vid>",
    "</vid>",
    "<VID_CONTEXT>",
)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load ``folder/tokenizer.json`` (or a path to the json file itself).

    Raises InputError naming the file if it is missing or not a valid tokenizer."""
    path = Path(folder)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"tokenizer file {str(path)!r} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for bad json/schema
        raise InputError(f"tokenizer file {str(path)!r} is corrupt or not a tokenizers json: {exc}") from None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the symbols ByteLevel pre-tokenisation
    emits), so the vocabulary can list the 256 bytes in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_default_tokenizer() -> Tokenizer:
    """A 268-token byte-level tokenizer built in code: ids 0..255 are the bytes, then
    SPECIAL_TOKENS in order. Any UTF-8 text round-trips through encode/decode."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the chat and media tokens in one tokenizer, resolved by string.

    The chat tokens and the image tokens are required; ``endoftext`` and the
    patch/video tokens may be absent (None), and build_inputs raises if a prompt needs
    one that is missing."""

    im_start: int
    im_end: int
    img_start: int
    img_end: int
    img_context: int
    endoftext: int | None = None
    patch_start: int | None = None
    patch_end: int | None = None
    patch_context: int | None = None
    vid_start: int | None = None
    vid_end: int | None = None
    vid_context: int | None = None

    # field -> token string; the single place the strings are tied to the fields
    STRINGS = {
        "endoftext": "<|endoftext|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "img_start": "<img>",
        "img_end": "</img>",
        "img_context": "<IMG_CONTEXT>",
        "patch_start": "<patch>",
        "patch_end": "</patch>",
        "patch_context": "<PATCH_CONTEXT>",
        "vid_start": "<vid>",
        "vid_end": "</vid>",
        "vid_context": "<VID_CONTEXT>",
    }
    REQUIRED = ("im_start", "im_end", "img_start", "img_end", "img_context")

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "SpecialTokens":
        """Resolve every id with ``token_to_id``; InputError names a missing required token."""
        ids = {}
        for name, text in cls.STRINGS.items():
            tid = tokenizer.token_to_id(text)
            if tid is None and name in cls.REQUIRED:
                raise InputError(f"tokenizer has no special token {text!r} (needed for the chat/image layout)")
            ids[name] = tid
        return cls(**ids)

    @property
    def eos_token_id(self) -> int:
        """Generation stops at ``<|im_end|>`` (Qwen2 ChatML)."""
        return self.im_end

    @property
    def context_token_ids(self) -> tuple[int, ...]:
        """Ids of the placeholder tokens the model replaces with vision embeddings
        (IMG_CONTEXT, PATCH_CONTEXT, VID_CONTEXT, those present)."""
        return tuple(t for t in (self.img_context, self.patch_context, self.vid_context) if t is not None)

    @property
    def media_token_ids(self) -> frozenset[int]:
        """Every media marker and placeholder id; user text must not contain these."""
        names = [f.name for f in fields(self) if f.name.startswith(("img", "patch", "vid"))]
        return frozenset(getattr(self, n) for n in names if getattr(self, n) is not None)

    def require(self, name: str) -> int:
        """The id of field ``name``; InputError if this tokenizer lacks that token."""
        tid = getattr(self, name)
        if tid is None:
            raise InputError(f"tokenizer has no special token {self.STRINGS[name]!r}, needed by this prompt")
        return tid
