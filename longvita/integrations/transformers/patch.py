"""``apply_longvita(model)``: longvita's kernels inside a loaded transformers model, in place.

- Attention: ``model.set_attn_implementation("longvita")`` (transformers' own switch; every
  sub-model of a composite model, so InternVL's vision tower too).
- Loss: the instance's ``forward`` is replaced (the class is untouched, so other models of
  the class are not) by one that, when ``labels`` are passed, runs the base model, takes its
  last hidden states (B, T, H) and computes the loss with ``kernels.linear_cross_entropy``
  against the LM head's weight: the (B, T, V) logits never exist, and the returned output
  has ``logits=None`` (as Liger-Kernel's and cut-cross-entropy's patches do). Without
  labels it is the class's forward, unchanged (generation, evaluation of logits).

The loss is transformers' ``ForCausalLMLoss``, computed without logits: labels shifted
within each row (``shift=True``; a row's last position predicts nothing, nothing predicts
across rows), ``ignore_index`` (default -100), ``shift_labels`` used as given when passed
(no shift), and with ``num_items_in_batch`` the sum over valid tokens divided by it (what
HF's Trainer passes under gradient accumulation), else the mean over valid tokens. The loss
is fp32 (fp64 for an fp64 model: transformers casts the logits to fp32 first, so it is
fp32 there). Memory: one bounded chunk of logits (``kernels/lm_head``), only labelled rows
projected.

The replacement forward keeps the class forward's signature (``functools.wraps``), so HF's
Trainer still sees its parameters (columns kept, ``num_items_in_batch`` passed).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import torch

from longvita.common import IGNORE_INDEX
from longvita.integrations.transformers.attention import ATTN_IMPLEMENTATION, CP_KWARG, register
from longvita.kernels import linear_cross_entropy

__all__ = ["CAUSAL_LMS", "BASE_MODELS", "apply_longvita"]

# the classes apply_longvita patches: causal LMs (attention + fused loss) ...
CAUSAL_LMS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
              "InternVLForConditionalGeneration")
# ... and their bare models (attention only: they have no LM head)
BASE_MODELS = ("Qwen2Model", "Qwen3Model", "LlamaModel", "MistralModel", "InternVLModel")


def _classes(names) -> tuple[type, ...]:
    import transformers

    return tuple(c for c in (getattr(transformers, n, None) for n in names) if c is not None)


def model_kind(model, caller: str = "apply_longvita") -> str:
    """'causal_lm' or 'base'; a TypeError naming the class for anything else."""
    if isinstance(model, _classes(CAUSAL_LMS)):
        return "causal_lm"
    if isinstance(model, _classes(BASE_MODELS)):
        return "base"
    raise TypeError(f"{caller} supports {', '.join(CAUSAL_LMS + BASE_MODELS)}; got {type(model).__name__}")


@dataclasses.dataclass
class ForwardOptions:
    """What the installed forward of one model instance does (set by apply_longvita and
    context_parallel). Kept in the instance's ``__dict__`` and read from there on every
    call, so a ``copy.deepcopy`` of the model (TRL's reference models) is a model of its own."""

    positional: tuple[str, ...]  # the class forward's positional parameter names
    fused_loss: bool = False
    cp: bool = False  # context_parallel applied: cp_group / cp_world below hold
    cp_group: object = None
    cp_world: int = 1


def _output_class(model):
    if isinstance(model, _classes(("InternVLForConditionalGeneration",))):
        from transformers.models.internvl.modeling_internvl import InternVLCausalLMOutputWithPast

        return InternVLCausalLMOutputWithPast
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast


def install_forward(model) -> ForwardOptions:
    """Replace ``model.forward`` (this instance only) by longvita's, once; return its options."""
    options = model.__dict__.get("_longvita_forward")
    if options is not None:
        return options
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    signature = inspect.signature(type(model).forward.__get__(model))
    options = ForwardOptions(positional=tuple(p.name for p in signature.parameters.values() if p.kind in kinds))

    @functools.wraps(type(model).forward)  # inspect.signature (HF Trainer) sees the class's parameters
    def forward(self, *args, **kwargs):  # closes over nothing: a deep copy rebinds it to the copy
        return _forward(self, self.__dict__["_longvita_forward"], args, kwargs)

    model.__dict__["_longvita_forward"] = options
    model.forward = types.MethodType(forward, model)
    return options


def _forward(model, options: ForwardOptions, args: tuple, kwargs: dict):
    if args:
        if len(args) > len(options.positional):
            raise TypeError(f"forward() takes {len(options.positional)} positional arguments, got {len(args)}")
        for name, value in zip(options.positional, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
    shard = kwargs.get(CP_KWARG)
    if shard is not None or options.cp:
        _check_context_parallel(model, options, shard, kwargs)
    if not options.fused_loss or kwargs.get("labels") is None:
        return type(model).forward(model, **kwargs)  # the class's own
    return _fused_loss_forward(model, kwargs)


def _check_context_parallel(model, options: ForwardOptions, shard, kwargs: dict) -> None:
    if shard is None:
        if options.cp_world > 1 and kwargs.get("labels") is not None:
            raise ValueError(
                f"the model is context-parallel over {options.cp_world} ranks but the batch was not sharded: pass it "
                "through shard_batch(batch, group) first (unsharded, every rank would add the whole batch's loss)"
            )
        return
    config = model.config
    implementations = {getattr(c, "_attn_implementation", None) for c in (config, getattr(config, "text_config", None))
                       if c is not None}
    if ATTN_IMPLEMENTATION not in implementations:
        raise ValueError(
            f"a batch from shard_batch needs the \"{ATTN_IMPLEMENTATION}\" attention implementation (ring attention), "
            f"but the model uses {sorted(str(i) for i in implementations)}: call context_parallel(model, group)"
        )
    if options.cp and shard.group is not options.cp_group:
        raise ValueError("the batch was sharded over another process group than the one given to context_parallel")
    if kwargs.get("pixel_values") is not None:
        raise ValueError(
            "under context parallelism give the model inputs_embeds (images placed on every rank) to shard_batch, "
            "not pixel_values: a rank's shard cuts through images"
        )


def _fused_loss_forward(model, kwargs: dict):
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    kwargs.pop("logits_to_keep", None)  # no logits are made
    return_dict = kwargs.pop("return_dict", None)
    num_items = kwargs.get("num_items_in_batch")  # also goes down, as transformers passes it
    outputs = model.model(**kwargs)
    hidden = outputs.last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    if shift_labels is not None:
        target, shift = shift_labels, False
    else:
        target, shift = labels, True
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(hidden.device)
    loss = linear_cross_entropy(
        hidden, head.weight, target.to(hidden.device), shift=shift, ignore_index=ignore_index, num_valid=num_items,
        bias=head.bias,
    )
    cls = _output_class(model)
    fields = {f.name: getattr(outputs, f.name, None) for f in dataclasses.fields(cls) if f.name not in ("loss", "logits")}
    out = cls(loss=loss, logits=None, **fields)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def apply_longvita(model, *, attention: bool = True, fused_loss: bool = True):
    """Put longvita's kernels into a loaded transformers model, in place; returns ``model``.

    Args:
        model: a ``Qwen2ForCausalLM`` (Qwen2 / Qwen2.5), ``Qwen3ForCausalLM``,
            ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``InternVLForConditionalGeneration``
            (or their bare ``...Model``, which get attention only). Anything else: TypeError
            naming the class.
        attention: switch every attention module to ``attn_implementation="longvita"``
            (``longvita_attention``: packed, padded and cached batches, sliding windows, GQA).
        fused_loss: when ``labels`` are passed, compute the loss with the fused linear
            cross-entropy (no logits; ``logits`` is None in the output). See the module
            docstring for the loss's exact semantics.

    Calling it again is harmless (the forward is installed once; a later call with
    ``fused_loss=True`` turns it on).
    """
    kind = model_kind(model)
    if attention:
        register()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if fused_loss and kind == "causal_lm":
        install_forward(model).fused_loss = True
    return model
