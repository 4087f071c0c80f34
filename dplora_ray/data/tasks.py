"""Tasks: how an example is posed to a causal language model, by task type.

A task turns an example's text into a prompt that ends right before the answer, and
names the word a causal language model should produce next for each class. The label
words start with a space so that, after the prompt, each one is (for common byte-level
BPE tokenizers) the next token; models score the classes by the log-probability of the
label word's tokens.

Task types (:data:`TASK_TYPES`): every ``data.task`` has one, and the engine runs all three.

* ``classification`` (:data:`TASKS`, :class:`Task`): one label word per class, scored at
  the last prompt token; loss = cross-entropy over the label words; metrics accuracy,
  macro-F1, weighted F1.
* ``multiple_choice`` (:class:`MultipleChoiceTask`, PIQA-style): the prompt (the goal) is
  followed by each candidate solution in turn; a choice's score is the summed
  log-probability of its tokens given the prompt; the prediction is the likeliest choice.
  Training minimises the cross-entropy over the choice scores (one example = all its
  choice sequences; DP-SGD clips the example's summed per-sequence gradients together).
  Metric: accuracy.
* ``generation`` (:class:`GenerationTask`, MedQuAD-style): prompt = the question, target
  = the reference answer followed by the end-of-sequence token; training minimises the
  causal-LM loss on the answer tokens only (mean over an example's answer tokens, then
  over examples). Metrics: answer perplexity (teacher-forced) and ROUGE-L of the greedy
  answer against the reference (:mod:`dplora_ray.data.metrics`).

Invariants:
    * ``label_names`` and ``label_words`` have the same length (>= 2), without
      duplicates; an example's ``label`` is an index into them.
    * ``prompt_template`` contains ``{text}`` exactly once and ends right before the
      label word (no trailing space).
"""

from __future__ import annotations

from dataclasses import dataclass

from dplora_ray.errors import DataError

__all__ = [
    "ENGINE_TASK_TYPES",
    "GenerationTask",
    "MultipleChoiceTask",
    "TASKS",
    "TASK_TYPES",
    "Task",
    "get_task",
]

_PLACEHOLDER = "{text}"


def _check_template(name: str, template: str) -> None:
    # programming errors in a task definition, not user input: plain ValueError
    if template.count(_PLACEHOLDER) != 1:
        raise ValueError(f"task {name!r}: the template must contain {{text}} once")


def _fill(template: str, text: str) -> str:
    """``template`` with ``{text}`` replaced literally (braces in ``text`` are kept)."""
    return template.replace(_PLACEHOLDER, text.strip())


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
    kind: str = "classification"

    def __post_init__(self) -> None:
        # Programming errors in a task definition, not user input: plain ValueError.
        if len(self.label_names) < 2 or len(self.label_names) != len(self.label_words):
            raise ValueError(f"task {self.name!r}: need >= 2 labels, one word per label")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"task {self.name!r}: duplicate label names")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"task {self.name!r}: duplicate label words")
        _check_template(self.name, self.prompt_template)
        if self.prompt_template != self.prompt_template.rstrip():
            raise ValueError(f"task {self.name!r}: the template must not end in whitespace")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def format_prompt(self, text: str) -> str:
        """The prompt for one example (``{text}`` replaced literally; braces in ``text``
        are kept as they are)."""
        return _fill(self.prompt_template, text)


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


@dataclass(frozen=True)
class MultipleChoiceTask:
    """Pick the likeliest of ``num_choices`` continuations of a prompt.

    Attributes:
        name: registry name (``data.task``).
        prompt_template: the prompt with ``{text}`` (the goal/question); each choice
            follows it after ``choice_prefix``.
        num_choices: choices per example (fixed for a task).
        choice_prefix: text between the prompt and a choice (a space, so a choice starts
            a new word).
    """

    name: str
    prompt_template: str
    num_choices: int = 2
    choice_prefix: str = " "
    kind: str = MULTIPLE_CHOICE

    def __post_init__(self) -> None:
        if self.num_choices < 2:
            raise ValueError(f"task {self.name!r}: need >= 2 choices")
        _check_template(self.name, self.prompt_template)

    @property
    def label_names(self) -> tuple[str, ...]:
        """One "label" per choice position: a label is the index of the right choice."""
        return tuple(f"choice {i + 1}" for i in range(self.num_choices))

    @property
    def num_labels(self) -> int:
        return self.num_choices

    def format_prompt(self, text: str) -> str:
        return _fill(self.prompt_template, text)


@dataclass(frozen=True)
class GenerationTask:
    """Answer a prompt in free text; trained on the answer tokens only.

    Attributes:
        name: registry name (``data.task``).
        prompt_template: the prompt with ``{text}`` (the question); the answer follows it
            after ``answer_prefix``.
        answer_prefix: text between the prompt and the answer.
    """

    name: str
    prompt_template: str
    answer_prefix: str = " "
    kind: str = GENERATION

    def __post_init__(self) -> None:
        _check_template(self.name, self.prompt_template)

    @property
    def label_names(self) -> tuple[str, ...]:
        """A single pseudo-label (every example is "answer"), so partitioners and
        balanced test draws treat the data as one class."""
        return ("answer",)

    @property
    def num_labels(self) -> int:
        return 1

    def format_prompt(self, text: str) -> str:
        return _fill(self.prompt_template, text)


#: multiple-choice tasks (``data.task``)
CHOICE_TASKS: dict[str, MultipleChoiceTask] = {
    # PIQA (Bisk et al. 2020): the goal, then one of two solutions
    "multiple_choice": MultipleChoiceTask(
        name="multiple_choice",
        prompt_template="Question: {text}\nAnswer:",
        num_choices=2,
    ),
}
#: generation tasks (``data.task``)
GENERATION_TASKS: dict[str, GenerationTask] = {
    # MedQuAD-style consumer health questions answered in free text
    "qa_generation": GenerationTask(
        name="qa_generation",
        prompt_template="Answer the medical question.\nQuestion: {text}\nAnswer:",
    ),
}
AnyTask = Task | MultipleChoiceTask | GenerationTask
#: ``data.task`` -> its task type
TASK_TYPES: dict[str, str] = {
    **{name: CLASSIFICATION for name in TASKS},
    **{name: GENERATION for name in GENERATION_TASKS},
    **{name: MULTIPLE_CHOICE for name in CHOICE_TASKS},
}
#: the task types the federated engine trains and evaluates
ENGINE_TASK_TYPES: tuple[str, ...] = (CLASSIFICATION, MULTIPLE_CHOICE, GENERATION)


def get_task(name: str) -> AnyTask:
    """The registered task called ``name`` (``data.task``), of any type.

    Raises:
        DataError: ``data.task`` names no registered task.
    """
    for registry in (TASKS, CHOICE_TASKS, GENERATION_TASKS):
        if isinstance(name, str) and name in registry:
            return registry[name]
    choices = ", ".join(sorted(TASK_TYPES))
    raise DataError("data.task", name, f"unknown task; choose one of {choices}")
