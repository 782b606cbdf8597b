"""hosl.merge / adapter_model (halves -> one HF model / a PEFT adapter) and `hosl export RUN --out DIR`:
what transformers and peft load back gives the split model's logits."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hosl.cli import main
from hosl.export import adapter_model, merge
from hosl.models import load_model, split
from hosl.models.lora import apply_lora
from hosl.training import checkpoint as ckpt
from hosl.training.run import load_split_model

pytestmark = [pytest.mark.filterwarnings("ignore:hosl. no compiled kernels"), pytest.mark.filterwarnings("ignore::UserWarning")]

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")
DECODERS = ("tiny-opt", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma", "tiny-gpt2")
AUTO = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}


def _batch(tokenizer):
    ids = torch.randint(4, 250, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask


def _nudge_trainable(*halves, scale=0.05):
    """Stand-in for training: move every trainable tensor (seeded), so exported weights differ from a fresh model."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for half in halves:
            for p in half.parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


CASES = [(name, "causal_lm") for name in DECODERS] + [(name, "sequence_classification")
                                                       for name in ("tiny-bert", "tiny-qwen2", "tiny-gpt2")]


@pytest.mark.parametrize("name,kind", CASES)
def test_merge_round_trips_through_save_pretrained(tmp_path, name, kind):
    model, tokenizer = load_model(name, kind, num_labels=3 if kind != "causal_lm" else None)
    client, server = split(model, 2)
    _nudge_trainable(client, server)  # a tied head's two copies now differ
    ids, mask = _batch(tokenizer)
    expected = server(client(ids, mask), mask)
    merged = merge(client, server)
    merged.save_pretrained(tmp_path)
    loaded = AUTO[kind].from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    if kind == "causal_lm":  # the copies trained apart: saved untied, both matrices
        assert loaded.config.tie_word_embeddings is False
        assert torch.equal(loaded.get_output_embeddings().weight, server.lm_head.weight)
        assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gemma", "tiny-gpt2"])
def test_equal_head_copies_stay_tied(tmp_path, name):
    model, tokenizer = load_model(name, "causal_lm")
    client, server = split(model, 1)
    merged = merge(client, server)
    assert merged.config.tie_word_embeddings is True
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    merged.save_pretrained(tmp_path)
    ids, mask = _batch(tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, server(client(ids, mask), mask))


@pytest.mark.parametrize("name,kind", [(n, "causal_lm") for n in DECODERS] + [("tiny-bert", "sequence_classification")])
def test_lora_halves_give_a_peft_adapter_and_a_folded_model(tmp_path, name, kind):
    model, tokenizer = load_model(name, kind, num_labels=3 if kind != "causal_lm" else None)
    wrapped = apply_lora(model, r=2, alpha=4, train_head=kind != "causal_lm")
    client, server = split(wrapped, 2)
    _nudge_trainable(client, server)  # adapters (lora_B starts at 0) and the classifier head
    ids, mask = _batch(tokenizer)
    expected = server(client(ids, mask), mask)
    base, peft_model = adapter_model(client, server)
    base.save_pretrained(tmp_path / "base")
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AUTO[kind].from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    folded = merge(client, server)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(base(input_ids=ids, attention_mask=mask).logits, expected)  # the adapters matter


# -- hosl export ---------------------------------------------------------------------------------------


def _train(out, model, *extra):
    args = ["train", "--model", model, "--task", "sst2", "--data-dir", str(DATA), "--mode", "hosl", "--cut", "1",
            "--steps", "2", "--batch-size", "4", "--train-size", "8", "--eval-size", "4", "--num-queries", "2",
            "--max-length", "40", "--lr-client", "1e-2", "--lr-server", "1e-1", "--no-progress", "--out", str(out),
            *extra]
    assert main(args) == 0


def _split_from_run(run, folder=None):
    from hosl.run_loading import _config_of

    cfg = _config_of(Path(run))
    kind, tokenizer, client, server = load_split_model(cfg)
    latest = ckpt.latest_checkpoint(Path(folder or run))
    ckpt.load_checkpoint(latest, {"client": client, "server": server})
    return tokenizer, client.eval(), server.eval()


@needs_data
@pytest.mark.parametrize("model,kind", [("tiny-opt", "causal_lm"), ("tiny-qwen3", "causal_lm"),
                                        ("tiny-bert", "sequence_classification")])
def test_export_of_a_full_run_loads_with_from_pretrained(tmp_path, model, kind):
    _train(tmp_path / "run", model)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    tokenizer, client, server = _split_from_run(tmp_path / "run")
    record = json.loads((tmp_path / "hf" / "hosl_export.json").read_text())
    assert record["step"] == 2 and record["auto_class"] == AUTO[kind].__name__
    loaded = AUTO[kind].from_pretrained(tmp_path / "hf").eval()
    ids, mask = _batch(tokenizer)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, server(client(ids, mask), mask))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("a b")["input_ids"] == tokenizer("a b")["input_ids"]
    if kind == "causal_lm":  # two steps moved the client's embedding and the server's head apart
        assert record["tie_word_embeddings"] is False and loaded.config.tie_word_embeddings is False


@needs_data
def test_export_of_a_lora_run_writes_base_adapter_and_merged(tmp_path):
    _train(tmp_path / "run", "tiny-llama", "--lora", "--lora-r", "2")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--merge-lora"]) == 0
    tokenizer, client, server = _split_from_run(tmp_path / "run")
    ids, mask = _batch(tokenizer)
    expected = server(client(ids, mask), mask)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "base")
    assert base.config.tie_word_embeddings is True  # LoRA left the embedding and the head alone
    loaded = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "merged").eval()
    torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-5)


@needs_data
def test_export_reads_a_two_process_layout_and_refuses_bad_folders(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "tiny-gpt2")
    # the layout of a two-process --out: client/ and server/ run folders, each with its half
    two = tmp_path / "two"
    for half in ("client", "server"):
        step = two / half / "checkpoints" / "step-2"
        step.mkdir(parents=True)
        shutil.copy(run / "checkpoints" / "step-2" / f"{half}.safetensors", step)
        shutil.copy(run / "checkpoints" / "step-2" / "state.pt", step)
        (two / half / "checkpoints" / "latest").write_text("step-2")
        shutil.copy(run / "config.json", two / half)
    assert main(["export", str(two), "--out", str(tmp_path / "hf")]) == 0
    tokenizer, client, server = _split_from_run(run)
    ids, mask = _batch(tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, server(client(ids, mask), mask))

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    (tmp_path / "nocheckpoint").mkdir()
    shutil.copy(run / "config.json", tmp_path / "nocheckpoint")
    capsys.readouterr()
    for args, message in (
        ([str(run), "--out", str(tmp_path / "busy")], "is not an empty folder"),
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "does not exist"),
        ([str(tmp_path / "busy"), "--out", str(tmp_path / "x")], "not a hosl run folder: no config.json"),
        ([str(tmp_path / "nocheckpoint"), "--out", str(tmp_path / "x")], "holds no checkpoint"),
    ):
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and not (tmp_path / "x").exists()
