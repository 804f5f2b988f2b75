"""`gemma2-tune eval`: the mode a request asks for, each mode one function, in the order the command runs them.

    loss     held-out loss on model-turn tokens, base vs fine-tuned and --compare models   (evaluate.py)
    rewards  the mean reward of each model's answers to held-out prompts                     (reward_eval.py)
    pairs    a reward model's pairwise accuracy on held-out preference pairs                 (preference_eval.py)
    tasks    lm-evaluation-harness tasks; suite: the Gemma 2 report's benchmark table        (harness.py)

Every rule between the options is the request's (config/requests.py EvalRequest). Everything that can fail
without the model is done before it loads: the rows read, the reward functions imported and checked against the
rows' columns, the suite's data fetched, the --compare models checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config.requests import DEFAULT_EVAL_LENGTH, EvalRequest
from ..errors import UserError
from .inference import Loaded, TrainedRun, load, thinking_for

Echo = Callable[[str], None]


@dataclass
class Evaluation:
    """What every mode reads: the request, the run (`label`: the row name of a model without an adapter), the
    resolved row length and thinking switch, the --compare loaders, and the rows when --dataset was read."""

    request: EvalRequest
    run: TrainedRun
    label: str
    max_length: int
    thinking: bool
    others: list
    rows: Any = None  # the data section (SftDataSection, or PreferenceDataSection for a reward model)
    read: Any = None  # load_rows(rows): (rows, source)

    @property
    def scores_pairs(self) -> bool:
        """A reward model: scored on preference pairs."""
        return self.run.head != "causal-lm"


def prepare(request: EvalRequest, run: TrainedRun, load_in: str, label: str, echo: Echo,
            warn: Echo) -> Evaluation:
    """Everything checked and read before the model loads. Raises UserError."""
    from ..models.loading import checkpoint_family
    from .evaluate import compare_loaders

    if run.head != "causal-lm":
        problem = request.reward_model_problem(run.path)
        if problem:
            raise UserError(problem)
    max_length = request.max_length
    if max_length is None:  # the length the run trained and scored its held-out rows at
        max_length = run.config.data.max_length if run.config else DEFAULT_EVAL_LENGTH
        if request.dataset:
            source = "the run's data.max_length" if run.config else "the default"
            echo(f"rows up to {max_length} tokens ({source}; --max-length to change)")
    if request.suite:
        from .harness import check_suite_data

        check_suite_data(request.suite, request.include_path)  # before the model: missing data fails in seconds
    others = compare_loaders(request.compare, run, load_in, warn, taken={"base", "fine-tuned", label})
    thinking = thinking_for(request.enable_thinking, run, checkpoint_family(run.base_model)[0])
    evaluation = Evaluation(request, run, label, max_length, thinking, others)
    if request.dataset:  # read before any model loads: an empty or unreadable source is said in seconds
        from ..config.schema import PreferenceDataSection, SftDataSection
        from ..data.sources import load_rows

        section = PreferenceDataSection if evaluation.scores_pairs else SftDataSection
        evaluation.rows = section(dataset=request.dataset, max_length=max_length, max_rows=request.max_rows,
                                  system_policy=run.system_policy, enable_thinking=thinking)
        evaluation.read = load_rows(evaluation.rows)
    return evaluation


def loss(evaluation: Evaluation, loaded: Loaded, echo: Echo) -> dict[str, Any]:
    """Held-out loss of the run, its base (adapter off) and each --compare model on the same tokens."""
    from .evaluate import evaluate

    return evaluate(loaded, evaluation.rows, compare_base=True, echo=echo, others=evaluation.others,
                    read=evaluation.read)


def rewards(evaluation: Evaluation, loaded: Loaded, scorers: tuple, echo: Echo) -> dict[str, Any]:
    """Mean rewards of each model's answers (`scorers`: reward_scorers' functions and reward-model tokenizer)."""
    from .inference import Sampling
    from .reward_eval import load_scoring_model, reward_table

    request = evaluation.request
    functions, tokenizer = scorers
    scoring = load_scoring_model(request.reward_model, tokenizer, loaded)
    return reward_table(loaded, evaluation.rows, evaluation.run.system_policy, functions, scoring,
                        Sampling(request.max_new_tokens, request.temperature), request.samples, compare_base=True,
                        others=evaluation.others, echo=echo, model_label=evaluation.label, read=evaluation.read)


def pairs(evaluation: Evaluation, loaded: Loaded, echo: Echo) -> dict[str, Any]:
    """A reward model's pairwise accuracy and margin (and each --compare reward model's)."""
    from .preference_eval import preference_table

    return preference_table(loaded, evaluation.rows, others=evaluation.others, echo=echo,
                            model_label=evaluation.label)


def tasks(evaluation: Evaluation, loaded: Loaded, echo: Echo) -> dict[str, Any]:
    """lm-evaluation-harness tasks on the loaded model."""
    from .harness import run_tasks

    request = evaluation.request
    return run_tasks(loaded.model, loaded.tokenizer, request.task_names, request.include_path, request.limit,
                     echo=echo)


def suite(evaluation: Evaluation, loaded: Loaded, echo: Echo) -> dict[str, Any]:
    """The Gemma 2 report's benchmarks beside the published scores of the base of the same size (Gemma 2 only)."""
    from .harness import run_suite

    request, config = evaluation.request, loaded.model.config
    size = loaded.family.size_of_shape(config.hidden_size, config.num_hidden_layers) \
        if loaded.family.key == "gemma2" else None
    return run_suite(loaded.model, loaded.tokenizer, request.suite, size, request.include_path, request.limit,
                     echo=echo)


def write_json(evaluation: Evaluation, table: dict[str, Any], echo: Echo) -> None:
    """The loss or reward table into --json, with the row length and row cap it was scored at."""
    from ..files import write_text_atomic

    request = evaluation.request
    target = Path(request.json_path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    table = {"dataset": table.get("dataset"), "max_length": evaluation.max_length, "max_rows": request.max_rows} | table
    write_text_atomic(target, json.dumps(table, indent=2) + "\n")
    echo(f"written: {request.json_path}")


def run_eval(request: EvalRequest, run: TrainedRun, load_in: str, label: str, echo: Echo, warn: Echo) -> None:
    """Run every mode `request` asks for on `run` (loaded once). Raises UserError."""
    evaluation = prepare(request, run, load_in, label, echo, warn)
    scorers = None
    if request.scores_rewards:  # imported and checked against the rows' columns before any model loads
        from ..data.prompts import row_columns
        from ..models.loading import checkpoint_family
        from ..rewards import column_problems
        from .reward_eval import reward_scorers

        scorers = reward_scorers(request, checkpoint_family(run.base_model)[0], run.system_policy)
        problems = column_problems(scorers[0], [row_columns(row.data) for row in evaluation.read[0]])
        if problems:
            raise UserError("\n".join(problems))
    loaded = load(run, load_in)
    loaded.thinking = evaluation.thinking
    table = None
    if request.scores_rewards:
        table = rewards(evaluation, loaded, scorers, echo)
    elif evaluation.scores_pairs:
        table = pairs(evaluation, loaded, echo)
    elif request.dataset:
        table = loss(evaluation, loaded, echo)
    if table is not None and request.json_path is not None:
        write_json(evaluation, table, echo)
    if request.tasks:
        tasks(evaluation, loaded, echo)
    if request.suite:
        suite(evaluation, loaded, echo)
