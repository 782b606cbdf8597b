"""Task layer on the real task data: loading, labels, sampling, templates, errors.

The data folder is HOSL_DATA_DIR, by default ../shared/data next to the repository; tests that need
it are skipped (with the path in the reason) when it is absent.
"""

import os
from pathlib import Path

import pytest

from hosl.tasks import get_template, known_tasks, load_task, sample_task

DATA_DIR = Path(os.environ.get("HOSL_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "superglue").is_dir(), reason=f"task data not found at {DATA_DIR} (set HOSL_DATA_DIR)"
)

# Row counts from the data folder's README (MultiRC: 83 passages -> 4,848 answer rows, 953 questions).
EXPECTED_ROWS = {
    ("sst2", "train"): 67349,
    ("sst2", "validation"): 872,
    ("cb", "train"): 250,
    ("cb", "validation"): 56,
    ("rte", "train"): 2490,
    ("rte", "validation"): 277,
    ("wsc", "train"): 554,
    ("wsc", "validation"): 104,
    ("boolq", "train"): 32,
    ("boolq", "validation"): 3270,
    ("wic", "train"): 32,
    ("wic", "validation"): 638,
    ("copa", "train"): 32,
    ("copa", "validation"): 100,
}

SCHEMA = {
    "sst2": {"sentence", "label", "idx"},
    "rte": {"premise", "hypothesis", "label", "idx"},
    "cb": {"premise", "hypothesis", "label", "idx"},
    "boolq": {"question", "passage", "label", "idx"},
    "wsc": {"text", "span1_index", "span2_index", "span1_text", "span2_text", "label", "idx"},
    "wic": {"word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "label", "idx"},
    "copa": {"premise", "choice1", "choice2", "question", "label", "idx"},
    "multirc": {"paragraph", "question", "answer", "label", "idx"},
}

NUM_LABELS = {"cb": 3}


@needs_data
@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("task", [t for t in known_tasks() if t != "sst2"])
def test_superglue_tasks_load_with_int_labels(task, split):
    ds = load_task(task, split, DATA_DIR)
    if (task, split) in EXPECTED_ROWS:
        assert len(ds) == EXPECTED_ROWS[(task, split)]
    assert SCHEMA[task] <= set(ds.column_names)
    labels = ds["label"]
    assert all(type(label) is int for label in labels)
    assert set(labels) == set(range(NUM_LABELS.get(task, 2)))


@needs_data
def test_sst2_loads_from_tsv_with_header_renamed_to_sentence():
    train = load_task("sst2", "train", DATA_DIR)
    dev = load_task("SST-2", "dev", DATA_DIR)
    assert len(train) == EXPECTED_ROWS[("sst2", "train")] and len(dev) == EXPECTED_ROWS[("sst2", "validation")]
    assert set(train.column_names) == SCHEMA["sst2"]
    assert train[0]["sentence"].startswith("hide new secretions from the parental units")
    assert train[0]["label"] == 0 and train[2]["label"] == 1
    assert set(dev["label"]) == {0, 1}
    assert all(isinstance(s, str) and s.strip() for s in dev["sentence"])


@needs_data
def test_string_labels_are_normalised_in_hub_order():
    cb = load_task("cb", "validation", DATA_DIR)
    # First three CB validation rows: contradiction, neutral, ... (hub order: entailment, contradiction, neutral)
    assert cb[0]["label"] == 1 and cb[1]["label"] == 2
    rte = load_task("rte", "train", DATA_DIR)
    assert rte[0]["label"] == 1  # not_entailment
    assert rte[1]["label"] == 0  # entailment


@needs_data
def test_nested_local_formats_are_flattened_to_hub_rows():
    wsc = load_task("wsc", "train", DATA_DIR)[0]
    assert (wsc["span1_text"], wsc["span2_text"], wsc["span2_index"]) == ("Mark", "He", 13)
    assert wsc["label"] == 0
    multirc = load_task("multirc", "validation", DATA_DIR)
    assert len(multirc) == 4848
    assert len({(r["paragraph"], r["question"]) for r in multirc["idx"]}) == 953
    first = multirc[0]
    assert first["question"].startswith("Would the mass of a baseball affect")
    assert (first["answer"], first["label"]) == ("No", 0)
    assert (multirc[1]["answer"], multirc[1]["label"]) == ("Yes", 1)


# ----- sampling --------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("task", ["boolq", "wic"])
def test_boolq_wic_train_from_validation_is_disjoint_and_noted(task):
    data = sample_task(task, DATA_DIR, train_size=1000, eval_size=1000, seed=3)
    pool = EXPECTED_ROWS[(task, "validation")]
    train_ids = {ex["idx"] for ex in data.train}
    eval_ids = {ex["idx"] for ex in data.eval}
    assert len(train_ids) == len(data.train) and len(eval_ids) == len(data.eval)  # no duplicates
    assert not train_ids & eval_ids
    assert len(data.eval) == min(1000, pool // 2)
    assert len(data.train) == min(1000, pool - len(data.eval))
    validation_ids = set(load_task(task, "validation", DATA_DIR)["idx"])
    assert train_ids <= validation_ids and eval_ids <= validation_ids
    note = " ".join(data.notes)
    assert "validation" in note and "disjoint" in note


@needs_data
def test_shared_pool_keeps_multirc_paragraphs_on_one_side():
    data = sample_task("multirc", DATA_DIR, train_size=500, eval_size=500, train_from_validation=True)
    train_paragraphs = {ex["idx"]["paragraph"] for ex in data.train}
    eval_paragraphs = {ex["idx"]["paragraph"] for ex in data.eval}
    assert train_paragraphs and eval_paragraphs and not train_paragraphs & eval_paragraphs


@needs_data
def test_sampling_is_deterministic_and_seed_dependent():
    a = sample_task("rte", DATA_DIR, train_size=50, eval_size=20, seed=1)
    b = sample_task("rte", DATA_DIR, train_size=50, eval_size=20, seed=1)
    c = sample_task("rte", DATA_DIR, train_size=50, eval_size=20, seed=2)
    assert a.train == b.train and a.eval == b.eval
    assert [e["idx"] for e in a.train] != [e["idx"] for e in c.train]
    assert len(a.train) == 50 and len(a.eval) == 20
    # eval_seed pins the evaluation subset while the training draw changes.
    d = sample_task("rte", DATA_DIR, train_size=50, eval_size=20, seed=2, eval_seed=1)
    assert d.eval == a.eval and d.train == c.train


@needs_data
def test_small_train_split_is_used_whole_and_noted():
    data = sample_task("cb", DATA_DIR, train_size=1000, eval_size=1000)
    assert len(data.train) == 250 and len(data.eval) == 56
    assert len({ex["idx"] for ex in data.train}) == 250
    assert any("only 250" in n for n in data.notes)


# ----- templates -------------------------------------------------------------------------------


@needs_data
def test_templates_render_the_gold_verbalizer_on_real_rows():
    rte = load_task("rte", "validation", DATA_DIR)
    entailed = next(r for r in rte if r["label"] == 0)
    t = get_template("rte")
    assert t.encode(entailed).endswith('" is true? Yes or No?\n')
    assert t.encode(entailed).startswith(entailed["premise"] + "\nDoes this mean that \"")
    assert t.options(entailed)[t.label(entailed)] == "Yes"

    cb = load_task("cb", "validation", DATA_DIR)
    neutral = next(r for r in cb if r["label"] == 2)
    t = get_template("cb")
    assert t.encode(neutral).startswith("Suppose ") and t.encode(neutral).endswith("Yes, No, or Maybe?\n")
    assert t.options(neutral)[t.label(neutral)] == "Maybe"

    sst2 = load_task("sst2", "validation", DATA_DIR)
    t = get_template("sst2")
    positive = next(r for r in sst2 if r["label"] == 1)
    assert t.verbalize(positive, t.label(positive)) == positive["sentence"].strip() + " It was great"
    assert t.options(positive) == [" terrible", " great"]

    boolq = load_task("boolq", "train", DATA_DIR)[0]
    t = get_template("boolq")
    assert boolq["question"] == "is ghost in the shell based on the anime"
    assert t.encode(boolq).endswith(" Is ghost in the shell based on the anime?")
    assert t.options(boolq)[boolq["label"]] == (" Yes" if boolq["label"] else " No")

    wsc = load_task("wsc", "train", DATA_DIR)[0]
    assert get_template("wsc").encode(wsc).endswith('does the pronoun "he" refer to Mark? Yes or No?\n')
    assert get_template("wsc").options(wsc)[wsc["label"]] == "No"

    wic = load_task("wic", "validation", DATA_DIR)[0]
    assert get_template("wic").encode(wic) == (
        'Does the word "class" have the same meaning in these two sentences? Yes, No?\n'
        f"{wic['sentence1']}\n{wic['sentence2']}\n"
    )

    copa = load_task("copa", "train", DATA_DIR)[0]  # cause; "The chandelier dropped from the ceiling."
    t = get_template("copa")
    assert t.encode(copa) == "The chandelier shattered on the floor because"
    assert t.options(copa)[t.label(copa)] == " the chandelier dropped from the ceiling."
    effect = next(r for r in load_task("copa", "validation", DATA_DIR) if r["question"] == "effect")
    assert t.encode(effect).endswith(" so")
    assert "Choice 1:" in t.classifier_text(effect)


def test_a_format_prompt_fills_the_fields_and_leaves_braces_in_the_values_alone():
    ex = {"paragraph": "P {0}.", "question": "Q {x}?", "answer": "A", "label": 1}
    assert get_template("multirc").encode(ex) == (
        'P {0}.\nQuestion: Q {x}?\nI found this answer "A". Is that correct? Yes or No?\n'
    )


def test_copa_keeps_the_pronoun_I_capitalised():
    t = get_template("copa")
    ex = {"premise": "I was hungry.", "choice1": "I ate.", "choice2": "My friend left.", "question": "effect", "label": 0}
    assert t.options(ex) == [" I ate.", " my friend left."]


# ----- errors ----------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_task("mnli", "train", "/nonexistent")
    for name in ("sst2", "rte", "cb", "boolq", "wsc", "wic"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="known tasks"):
        sample_task("glue", "/nonexistent")


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        load_task("rte", "test", "/nonexistent")


def test_missing_data_dir_and_missing_file_name_the_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_task("rte", "train", missing)
    assert str(missing) in str(err.value) and "superglue/<Task>" in str(err.value)
    (tmp_path / "superglue" / "RTE").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        load_task("rte", "validation", tmp_path)
    assert str(tmp_path / "superglue" / "RTE" / "val.jsonl") in str(err.value)


@pytest.mark.parametrize("sizes", [{"train_size": 0}, {"eval_size": 0}, {"train_size": -5}, {"eval_size": 2.5}])
def test_sizes_below_one_are_rejected(sizes):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        sample_task("rte", "/nonexistent", **sizes)


def test_unknown_string_label_is_an_error(tmp_path):
    folder = tmp_path / "superglue" / "CB"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": "unsure", "idx": 0}\n')
    with pytest.raises(ValueError, match="unsure"):
        load_task("cb", "train", tmp_path)


# ----- hub path (offline: the hub call is replaced, the normalisation is real) ------------------


def test_hub_path_asks_for_the_right_dataset_and_keeps_hub_rows(monkeypatch):
    import datasets

    import hosl.tasks.data as data_module

    hub_rows = {
        ("nyu-mll/glue", "sst2"): [{"sentence": "a fine film ", "label": 1, "idx": 7}],
        ("aps/super_glue", "cb"): [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}],
        ("aps/super_glue", "wsc.fixed"): [
            {"text": "t", "span1_index": 0, "span2_index": 3, "span1_text": "A", "span2_text": "it", "label": 1, "idx": 5}
        ],
        ("aps/super_glue", "multirc"): [
            {"paragraph": "p", "question": "q", "answer": "a", "label": 0, "idx": {"paragraph": 1, "question": 2, "answer": 3}}
        ],
    }
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(hub_rows[(path, name)])

    monkeypatch.setattr(data_module.datasets, "load_dataset", fake_load_dataset)
    assert load_task("sst2", "dev")[0] == hub_rows[("nyu-mll/glue", "sst2")][0]
    assert load_task("cb", "train")[0]["label"] == 2
    assert load_task("wsc", "val")[0] == hub_rows[("aps/super_glue", "wsc.fixed")][0]
    assert load_task("multirc", "validation")[0] == hub_rows[("aps/super_glue", "multirc")][0]
    assert calls == [
        ("nyu-mll/glue", "sst2", "validation"),
        ("aps/super_glue", "cb", "train"),
        ("aps/super_glue", "wsc.fixed", "validation"),
        ("aps/super_glue", "multirc", "validation"),
    ]
