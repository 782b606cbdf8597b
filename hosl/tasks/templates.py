"""MeZO's prompt templates (Malladi et al. 2023, written here from the paper/repository's prompts).

A template turns an example (hub-schema dict, see registry.py) into
- ``encode(example)``: the prompt a causal LM continues;
- ``options(example)``: the candidate continuations, in label order. ``encode(ex) + options(ex)[i]``
  is exactly MeZO's verbalised text for candidate ``i``: a separating space belongs to the option
  (" great"), a separating newline to the prompt ("...Yes or No?\\n" + "Yes"), so that an option's
  tokens are the answer tokens whichever BPE tokenizer is used;
- ``label(example)``: the index of the gold option;
- ``classifier_text(example)``: the single text an encoder with a classification head reads.

``verbalizer`` holds the bare answer words of fixed-option tasks (COPA's options are its choices).
"""

from __future__ import annotations

from .registry import TaskSpec, get_task_spec


class PromptTemplate:
    task: str = ""
    verbalizer: tuple[str, ...] = ()
    # What goes between prompt and answer word; part of the option (see module docstring).
    option_prefix: str = ""
    # The prompt as a str.format over the example's fields; a template whose prompt is no plain
    # format of them (it strips, lower-cases, ...) overrides encode instead.
    prompt: str = ""

    def encode(self, example: dict) -> str:
        if not self.prompt:
            raise NotImplementedError(f"{type(self).__name__} has neither a prompt nor an encode of its own")
        return self.prompt.format(**example)

    def options(self, example: dict) -> list[str]:
        return [self.option_prefix + word for word in self.verbalizer]

    def label(self, example: dict) -> int:
        return int(example["label"])

    @property
    def num_options(self) -> int:
        return get_task_spec(self.task).num_labels

    def verbalize(self, example: dict, option_index: int) -> str:
        """Prompt followed by option ``option_index``: the full text a causal LM is scored on."""
        return self.encode(example) + self.options(example)[option_index]

    def classifier_text(self, example: dict) -> str:
        """Input text for an encoder classifier: the prompt, without trailing whitespace."""
        return self.encode(example).rstrip()


class SST2Template(PromptTemplate):
    task = "sst2"
    verbalizer = ("terrible", "great")
    option_prefix = " "

    def encode(self, example):
        return f"{example['sentence'].strip()} It was"


class RTETemplate(PromptTemplate):
    task = "rte"
    verbalizer = ("Yes", "No")  # label 0 = entailment
    prompt = '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'


class CBTemplate(PromptTemplate):
    task = "cb"
    verbalizer = ("Yes", "No", "Maybe")  # entailment, contradiction, neutral
    prompt = 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'


class BoolQTemplate(PromptTemplate):
    task = "boolq"
    verbalizer = ("No", "Yes")
    option_prefix = " "

    def encode(self, example):
        question = example["question"].strip()
        if not question.endswith("?"):
            question += "?"
        question = question[:1].upper() + question[1:]
        return f"{example['passage']} {question}"


class WSCTemplate(PromptTemplate):
    task = "wsc"
    verbalizer = ("No", "Yes")

    def encode(self, example):
        return (
            f"{example['text']}\nIn the previous sentence, does the pronoun "
            f'"{example["span2_text"].lower()}" refer to {example["span1_text"]}? Yes or No?\n'
        )


class WiCTemplate(PromptTemplate):
    task = "wic"
    verbalizer = ("No", "Yes")
    prompt = 'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n'


class MultiRCTemplate(PromptTemplate):
    task = "multirc"
    verbalizer = ("No", "Yes")
    prompt = '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n'


class COPATemplate(PromptTemplate):
    """``<premise without final '.'> because|so`` + `` <choice, first word lower-cased unless "I">``."""

    task = "copa"
    connectives = {"cause": "because", "effect": "so"}

    def _connective(self, example):
        question = example["question"]
        if question not in self.connectives:
            raise ValueError(f"COPA question must be 'cause' or 'effect', got {question!r}")
        return self.connectives[question]

    def encode(self, example):
        premise = example["premise"].rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        return f"{premise} {self._connective(example)}"

    @staticmethod
    def _lower_first_word(choice: str) -> str:
        words = choice.strip().split(" ")
        if words[0] != "I":
            words[0] = words[0].lower()
        return " ".join(words)

    def options(self, example):
        return [" " + self._lower_first_word(example[f"choice{i}"]) for i in (1, 2)]

    def classifier_text(self, example):
        # The choices must be in the encoder's input, or it cannot tell which is meant.
        return (
            f"{self.encode(example)}?\nChoice 1: {example['choice1'].strip()}\n"
            f"Choice 2: {example['choice2'].strip()}\nWhich choice makes more sense? 1 or 2:"
        )


_TEMPLATES = {
    cls.task: cls
    for cls in (
        SST2Template,
        RTETemplate,
        CBTemplate,
        BoolQTemplate,
        WSCTemplate,
        WiCTemplate,
        COPATemplate,
        MultiRCTemplate,
    )
}


def get_template(task: str | TaskSpec) -> PromptTemplate:
    """MeZO's template for ``task`` (any spelling get_task_spec accepts, or its resolved spec)."""
    return _TEMPLATES[(task if isinstance(task, TaskSpec) else get_task_spec(task)).name]()
