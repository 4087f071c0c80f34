"""Tasks: classification tasks (a prompt template and one label word per class) and the
names of the task types the engine does not run yet.

A task turns an example's text into a prompt that ends right before the answer, and
names the word a causal language model should produce next for each class. The label
words start with a space so that, after the prompt, each one is (for common byte-level
BPE tokenizers) the next token; models score the classes by the log-probability of the
label word's tokens.

Task types (:data:`TASK_TYPES`): every ``data.task`` has one. The engine trains and
evaluates ``classification`` tasks (:data:`TASKS`). ``generation`` (``qa_generation``:
answer a question in free text; ROUGE-L and perplexity) and ``multiple_choice``
(``multiple_choice``: pick the likelier of the given solutions) are named so that configs
and loaders can refer to them; their metrics are in :mod:`dplora_ray.data.metrics`, and
:func:`get_task` refuses them with a one-line error.

Invariants:
    * ``label_names`` and ``label_words`` have the same length (>= 2), without
      duplicates; an example's ``label`` is an index into them.
    * ``prompt_template`` contains ``{text}`` exactly once and ends right before the
      label word (no trailing space).
"""

from __future__ import annotations

from dataclasses import dataclass

from dplora_ray.errors import DataError

__all__ = ["ENGINE_TASK_TYPES", "TASKS", "TASK_TYPES", "Task", "get_task"]

_PLACEHOLDER = "{text}"


@dataclass(frozen=True)
class Task:
    """A classification task posed to a causal language model.

    Attributes:
        name: registry name (``data.task``).
        label_names: class names; a label is an index into this tuple.
        label_words: the continuation that means each class, with a leading space
            (e.g. ``" positive"``).
        prompt_template: the prompt, with ``{text}`` where the example's text goes; it
            ends right before the label word.
    """

    name: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    prompt_template: str

    def __post_init__(self) -> None:
        # Programming errors in a task definition, not user input: plain ValueError.
        if len(self.label_names) < 2 or len(self.label_names) != len(self.label_words):
            raise ValueError(f"task {self.name!r}: need >= 2 labels, one word per label")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"task {self.name!r}: duplicate label names")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"task {self.name!r}: duplicate label words")
        if self.prompt_template.count(_PLACEHOLDER) != 1:
            raise ValueError(f"task {self.name!r}: the template must contain {{text}} once")
        if self.prompt_template != self.prompt_template.rstrip():
            raise ValueError(f"task {self.name!r}: the template must not end in whitespace")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def format_prompt(self, text: str) -> str:
        """The prompt for one example (``{text}`` replaced literally; braces in ``text``
        are kept as they are)."""
        return self.prompt_template.replace(_PLACEHOLDER, text.strip())


TASKS: dict[str, Task] = {
    "sentiment3": Task(
        name="sentiment3",
        label_names=("negative", "neutral", "positive"),
        label_words=(" negative", " neutral", " positive"),
        prompt_template=(
            "Classify the sentiment of the text as negative, neutral or positive.\n"
            "Text: {text}\nSentiment:"
        ),
    ),
    "yesno": Task(
        name="yesno",
        label_names=("no", "yes"),
        label_words=(" no", " yes"),
        prompt_template="Question: {text}\nAnswer (yes or no):",
    ),
    "yesnomaybe": Task(
        name="yesnomaybe",
        label_names=("no", "yes", "maybe"),
        label_words=(" no", " yes", " maybe"),
        prompt_template="Question: {text}\nAnswer (yes, no or maybe):",
    ),
    # The financial sentiment instruction of FinGPT's benchmarks (FPB, FiQA-SA, TFNS),
    # the evaluation the DP-LoRA paper's financial experiments follow. The braces around
    # the choices are literal text.
    "fin_sentiment": Task(
        name="fin_sentiment",
        label_names=("negative", "neutral", "positive"),
        label_words=(" negative", " neutral", " positive"),
        prompt_template=(
            "Instruction: What is the sentiment of this news? Please choose an answer "
            "from {negative/neutral/positive}.\nInput: {text}\nAnswer:"
        ),
    ),
}

CLASSIFICATION = "classification"
GENERATION = "generation"
MULTIPLE_CHOICE = "multiple_choice"
#: ``data.task`` -> its task type
TASK_TYPES: dict[str, str] = {
    **{name: CLASSIFICATION for name in TASKS},
    "qa_generation": GENERATION,
    "multiple_choice": MULTIPLE_CHOICE,
}
#: the task types the federated engine trains and evaluates
ENGINE_TASK_TYPES: tuple[str, ...] = (CLASSIFICATION,)


def get_task(name: str) -> Task:
    """The registered task called ``name`` (``data.task``).

    Raises:
        DataError: ``data.task`` names no registered task, or a task of a type the
            engine does not run yet.
    """
    kind = TASK_TYPES.get(name) if isinstance(name, str) else None
    if kind is not None and kind not in ENGINE_TASK_TYPES:
        raise DataError("data.task", name, f"is a {kind} task, not supported by the engine yet")
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        choices = ", ".join(sorted(TASKS))
        raise DataError("data.task", name, f"unknown task; choose one of {choices}") from None
