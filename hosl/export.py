"""Put a split model back together and write it where ``transformers`` and ``peft`` can load it.

``merge(client, server)`` returns one Hugging Face model (a fresh instance of the class the halves
were cut from) holding the halves' weights under the model's own parameter names:

* **Tied head.** ``split`` gave the server its own copy of a tied embedding/head (OPT, SmolLM2,
  the tiny decoders). If the two copies are still equal the merged model keeps
  ``tie_word_embeddings=True`` (one matrix); if training moved them apart it gets
  ``tie_word_embeddings=False`` and both matrices: the client's as the input embedding, the
  server's as the head. ``model.config.tie_word_embeddings`` says which.
* **LoRA.** Halves holding ``peft`` LoRA layers are folded (``W + B A * alpha/r``) by default;
  ``fold_lora=False`` returns the weights the adapters sit on instead (base layers, plus whatever
  trained fully: a classification head, the half without adapters).

``adapter_model(client, server)`` returns ``(base, peft_model)``: the base of ``fold_lora=False``
and a ``PeftModel`` over it whose adapters are the halves'; ``peft_model.save_pretrained`` writes
a PEFT adapter folder.

``hosl export RUN --out DIR`` (``hosl/run_export.py``) writes a run's model with these; the run
is found and loaded by ``hosl/run_loading.py`` (``hosl.load_run``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EXPORT_RECORD = "hosl_export.json"


class ExportError(ValueError):
    """The run folder or the output folder cannot be exported from / to; the message says why."""


# -- merging halves --------------------------------------------------------------------------------


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency of the models extra
        return None
    return LoraLayer


def _lora_modules(half: nn.Module) -> dict[str, Any]:  # peft LoraLayer modules
    cls = _lora_layer_class()
    if cls is None:
        return {}
    return {name: m for name, m in half.named_modules() if isinstance(m, cls)}


def plain_state(half: nn.Module, fold_lora: bool = True) -> dict[str, torch.Tensor]:
    """The half's state dict with LoRA layers turned back into plain ones: ``X.base_layer.weight``
    becomes ``X.weight`` (plus ``B A * scaling`` when ``fold_lora``), adapter tensors are dropped."""
    lora = _lora_modules(half)
    state = {}
    for key, value in half.state_dict().items():
        if ".base_layer." in key:
            prefix, rest = key.split(".base_layer.", 1)
            if prefix in lora:
                module = lora[prefix]
                if fold_lora and rest == "weight":
                    delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                    value = (value.float() + delta.float()).to(value.dtype)
                state[f"{prefix}.{rest}"] = value
                continue
        if any(part.startswith("lora_") for part in key.split(".")):
            continue  # lora_A / lora_B / ... of an adapter
        state[key] = value
    return state


def _auto_class(server):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from hosl.models import TASK_CAUSAL_LM, TASK_ENCODER

    if server.task == TASK_CAUSAL_LM:
        return AutoModelForCausalLM
    return AutoModel if server.task == TASK_ENCODER else AutoModelForSequenceClassification


def _assemble(client, server, fold_lora: bool):
    """(fresh model with the halves' weights, {(half, key in the half's plain state): [model keys]})."""
    from hosl.models import split

    if client.config is not server.config and client.config.to_dict() != server.config.to_dict():
        raise ValueError("merge(): the client and server halves come from models with different configs")
    config = server.config
    dtype = next(iter(client.state_dict().values())).dtype
    with torch.random.fork_rng(devices=[]):  # the fresh weights are all overwritten; leave the caller's RNG be
        fresh = _auto_class(server).from_config(config).to(dtype)
    fresh.eval()
    fresh_client, fresh_server = split(fresh, client.cut)
    if fresh_server.cut != server.cut:
        raise ValueError(f"merge(): client cut {client.cut} and server cut {server.cut} differ")

    names_of: dict[int, list[str]] = {}
    for name, tensor in fresh.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    head = fresh.get_output_embeddings() if hasattr(fresh, "get_output_embeddings") else None
    head_path = (
        next((name for name, module in fresh.named_modules() if module is head), None) if head is not None else None
    )
    # the model's own names of the head's tensors (a tied head's weight also has the embedding's name)
    head_names = {
        n: [f"{head_path}.{n}"] for n in ("weight", "bias") if head_path and getattr(head, n, None) is not None
    }

    key_map: dict[tuple[str, str], list[str]] = {}
    values: dict[str, list] = {}
    for side, real, fresh_half in (("client", client, fresh_client), ("server", server, fresh_server)):
        state = plain_state(real, fold_lora)
        fresh_state = fresh_half.state_dict(keep_vars=True)
        if state.keys() != fresh_state.keys():
            extra, missing = sorted(state.keys() - fresh_state.keys()), sorted(fresh_state.keys() - state.keys())
            raise ValueError(
                f"merge(): the {side} half does not match its model class: unexpected {extra[:5]}, "
                f"missing {missing[:5]}"
            )
        for key, tensor in fresh_state.items():
            targets = names_of.get(id(tensor))
            if targets is None and side == "server" and key.startswith("lm_head."):
                targets = head_names[key.split(".", 1)[1]]  # the server's untied copy of a tied head
            if targets is None:
                continue  # a server-side copy of client buffers (rotary tables are not in state_dict)
            key_map[(side, key)] = targets
            for target in targets:
                values.setdefault(target, []).append((side, state[key]))

    tied = bool(getattr(config, "tie_word_embeddings", False)) and head is not None
    untie, apart = False, None
    for sources in values.values():
        if len(sources) > 1 and not all(torch.equal(sources[0][1], v) for _, v in sources[1:]):
            untie = True  # the client's embedding and the server's head copy trained apart
            first, other = sources[0][1], sources[1][1]
            apart = (int((first != other).sum()), first.numel(), float((first.float() - other.float()).abs().max()))
    if untie:
        fresh.config.tie_word_embeddings = False
        if hasattr(fresh.config, "get_text_config"):
            fresh.config.get_text_config().tie_word_embeddings = False
        head.weight = nn.Parameter(head.weight.detach().clone())  # type: ignore[union-attr]  # untie implies a head; its own storage from now on
        head_keys = {name for names in head_names.values() for name in names}
        for target, sources in values.items():
            if len(sources) > 1:
                pick = "server" if target in head_keys else "client"
                values[target] = [next(s for s in sources if s[0] == pick)]

    target_state = fresh.state_dict(keep_vars=True)
    missing = sorted(set(target_state) - set(values))
    if missing:
        raise ValueError(f"merge(): no half holds {missing[:5]}")
    with torch.no_grad():
        for target, sources in values.items():
            target_state[target].copy_(sources[0][1])
    fresh.hosl_tied_head = tied and not untie  # an attribute for callers and the export record
    fresh.hosl_head_apart = apart  # (elements that differ, elements, largest difference) when untied
    return fresh, key_map


def merge(client, server, *, fold_lora: bool = True):
    """One Hugging Face model from a split's two halves (see the module docstring), in eval mode.

    ``model(input_ids=ids, attention_mask=mask).logits`` equals ``server(client(ids, mask), mask)``
    bit for bit for full fine-tuning (same device and dtype); with folded LoRA up to rounding.
    """
    model, _ = _assemble(client, server, fold_lora)
    return model


def adapter_model(client, server):
    """``(base, peft_model)``: the weights under the halves' LoRA adapters as a plain model, and a
    ``PeftModel`` over a second copy of it that holds the halves' adapters."""
    from peft import LoraConfig, get_peft_model

    lora = {side: _lora_modules(half) for side, half in (("client", client), ("server", server))}
    if not any(lora.values()):
        raise ValueError("adapter_model(): the halves hold no LoRA layers (use merge() for a full model)")
    base, key_map = _assemble(client, server, fold_lora=False)
    peft_base, _ = _assemble(client, server, fold_lora=False)
    full_paths, ranks, alphas, fan_in_fan_out = {}, set(), set(), False
    for side, modules in lora.items():
        for prefix, module in modules.items():
            targets = key_map[(side, f"{prefix}.weight")]
            path = targets[0][: -len(".weight")]
            full_paths[path] = module
            ranks.add(module.r["default"])
            alphas.add(module.lora_alpha["default"])
            fan_in_fan_out |= bool(getattr(module, "fan_in_fan_out", False))
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"adapter_model(): adapters of different ranks/alphas ({ranks}, {alphas}) are not supported")
    config = LoraConfig(
        r=ranks.pop(),
        lora_alpha=alphas.pop(),
        target_modules=sorted(full_paths),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
    )
    with torch.random.fork_rng(devices=[]):
        peft_model = get_peft_model(peft_base, config)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for path, module in full_paths.items():
            target = inner.get_submodule(path)
            for part in ("lora_A", "lora_B"):
                getattr(target, part)["default"].weight.copy_(getattr(module, part)["default"].weight)
    peft_model.eval()
    return base, peft_model
