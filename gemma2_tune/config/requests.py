"""The options of the after-training commands (merge, merge-models, serve, eval), checked as recipes are: a
pydantic schema per command (types, ranges, choices) plus its rules between options, every problem reported
at once, each naming its flag, exit 2. Light (pydantic only): the checks run before any model loads.

    request = check(MergeModelsRequest, {"--method": ("method", "slerp"), "--t": ("t", 0.3), ...})
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError
from ..files import writable_problem

Dtype = Literal["bfloat16", "float16", "float32"]
MERGE_METHODS = ("linear", "slerp", "ties", "dare_ties", "task_arithmetic")  # mergekit's names
NEEDS_BASE = ("ties", "dare_ties", "task_arithmetic")  # task vectors are taken from the base


class Request(BaseModel):
    """A command's options; `problems()` holds the rules between them (each naming its flag)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def problems(self) -> list[str]:
        return []


class MergeRequest(Request):
    """`merge`: an adapter run folded into its base."""

    adapter: str
    output: str
    model: str | None = None
    dtype: Dtype | None = None


class ServeRequest(Request):
    """`serve`: where to listen and in which precision."""

    target: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None
    name: str | None = None
    dtype: Dtype | None = None
    device: str = "auto"
    max_request_bytes: int | None = None  # its bounds and the key's are serve's (after/serve/run.py), one place
    continuous_batching: bool = True


class ExportRequest(Request):
    """`export`: a model folder to one GGUF file (the quantization types are llama.cpp's: after/export.py)."""

    target: str
    output: str
    to: str = "gguf"  # checked by export, which knows its formats
    quant: str = "f16"
    overwrite: bool = False
    ollama: bool = False


DEFAULT_EVAL_LENGTH = 1024  # eval --max-length for a model without a run config (a hub id, a merged folder)


# `eval --suite` names (after/harness.py SUITES holds each one's tasks and settings; a test keeps them equal).
EVAL_SUITES = ("gemma2-report",)
# Files that make a folder a run or a model folder: `eval --json` never writes over one of them.
MODEL_FOLDER_MARKERS = ("run.json", "config.yaml", "adapter_config.json", "config.json", "merge.json")


class EvalRequest(Request):
    """`eval`: held-out loss, rewards of generated answers, lm-eval tasks, or the report's suite; for a reward
    model, pairwise accuracy on preference pairs. Every rule between the options is here (`problems`, and
    `reward_model_problem` once the run is known); after/eval.py runs the mode the request asks for."""

    dataset: str | None = None
    tasks: str | None = None
    suite: str | None = None
    max_length: int | None = Field(None, gt=8)  # None: the run's data.max_length (DEFAULT_EVAL_LENGTH without one)
    max_rows: int | None = Field(None, gt=0)
    limit: int | None = None
    compare: list[str] = Field(default_factory=list)
    include_path: str | None = None
    reward_functions: list[str] = Field(default_factory=list)  # PATH.py:NAME, parsed by the command
    reward_model: str | None = None
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0)
    samples: int = Field(1, gt=0)
    json_path: str | None = None
    enable_thinking: bool | None = None  # None: the run's data.enable_thinking

    @property
    def scores_rewards(self) -> bool:
        """Answers are generated and rewarded (instead of the held-out loss)."""
        return bool(self.reward_functions or self.reward_model)

    @property
    def task_names(self) -> list[str]:
        """--tasks as a list of lm-eval task names."""
        return [t.strip() for t in (self.tasks or "").split(",") if t.strip()]

    def problems(self) -> list[str]:
        found = []
        if not self.dataset and not self.tasks and not self.suite:
            found.append("give --dataset (held-out chats), --tasks (lm-eval tasks) and/or --suite gemma2-report")
        if self.scores_rewards and not self.dataset:
            found.append("--reward-function/--reward-model score answers to prompts: give --dataset (the prompts)")
        if self.json_path and not self.dataset:
            found.append("--json writes the loss or reward table: give --dataset")
        if self.samples > 1 and self.temperature == 0:
            found.append(f"--samples {self.samples}: greedy answers are all the same; give --temperature > 0")
        if self.suite and self.tasks:
            found.append("--suite and --tasks: choose one (the suite names its own tasks)")
        if self.suite is not None and self.suite not in EVAL_SUITES:
            found.append(f"--suite {self.suite}: unknown; available: {', '.join(EVAL_SUITES)}")
        if self.compare and not self.dataset:
            found.append("--compare scores models on held-out chats: give --dataset too")
        if self.limit is not None and self.limit < 1:
            found.append(f"--limit {self.limit}: must be at least 1 (leave it out to score every example)")
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            found.append(f"--include-path {self.include_path}: no such folder")
        found += self._json_problems()
        return found

    def _json_problems(self) -> list[str]:
        """--json must name a new or replaceable file in a writable folder, never a run's or model's own file."""
        if self.json_path is None:
            return []
        target = Path(self.json_path).expanduser()
        problem = writable_problem(target.resolve().parent)
        if problem:
            return [f"--json {self.json_path}: {problem}"]
        if target.is_dir():
            return [f"--json {self.json_path}: a folder; give a file name (e.g. {self.json_path}/eval.json)"]
        if target.exists() and any((target.parent / f).is_file() for f in MODEL_FOLDER_MARKERS):
            return [f"--json {self.json_path}: a file of the run or model folder {target.parent}; it is not "
                    "overwritten: give a new file name"]
        return []

    def reward_model_problem(self, path: Any) -> str | None:
        """What a reward model (one score per answer, at `path`) cannot be asked: it is scored on preference pairs
        only (--dataset), optionally beside other reward models; None when the request fits."""
        defaults = {name: EvalRequest.model_fields[name].default for name in ("max_new_tokens", "temperature", "samples")}
        given = [flag for flag, value in (("--tasks", self.tasks), ("--suite", self.suite),
                                          ("--reward-function", self.reward_functions),
                                          ("--reward-model", self.reward_model), ("--limit", self.limit),
                                          ("--include-path", self.include_path)) if value]
        given += [f"--{name.replace('_', '-')}" for name, default in defaults.items() if getattr(self, name) != default]
        if given or not self.dataset:
            return (f"{', '.join(given) or 'eval'}: {path} is a reward model (one score per answer): eval scores it "
                    "on preference pairs: give --dataset (pairs: chosen/rejected) and optionally --compare other "
                    "reward models, --max-rows, --max-length")
        return None


class MergeModelsRequest(Request):
    """`merge-models`: mergekit's methods, then optionally LITI towards the base (WARP's last stage).

    t: SLERP's factor (0: the first model, 1: the second). weights: per model (linear: normalised; TIES/DARE/task
    arithmetic: task-vector scales). density: fraction of each task vector TIES/DARE keep. liti: eta in [0, 1]
    (0: the base, 1: the merge). seed: DARE's random drops."""

    method: Literal["linear", "slerp", "ties", "dare_ties", "task_arithmetic"] = "linear"
    models: list[str]
    output: str
    base: str | None = None
    t: float | None = None
    weights: list[float] | None = None
    density: float | None = None
    liti: float | None = None
    dtype: Dtype | None = None
    seed: int = 42

    def problems(self) -> list[str]:
        found = []
        method, models, weights = self.method, self.models, self.weights
        if not models:
            found.append("--models: name at least one model (run folders, merged folders or hub ids)")
        twice = same_location(models)
        if twice:
            found.append(f"--models: {twice} given more than once")
        if self.t is not None and method != "slerp":
            found.append(f"--t: only SLERP takes it (--method {method})")
        if self.density is not None and method not in ("ties", "dare_ties"):
            found.append(f"--density: only ties and dare_ties take it (--method {method})")
        finite_weights = weights is None or all(math.isfinite(w) for w in weights)
        if not finite_weights:
            found.append(f"--weights: {weights} must be finite numbers")
        if self.liti is not None and not math.isfinite(self.liti):
            found.append(f"--liti {self.liti}: must be a finite number in [0, 1]")
        elif self.liti is not None and not 0.0 <= self.liti <= 1.0:
            found.append(f"--liti {self.liti}: must be in [0, 1] (0: the base, 1: the merge)")
        if method == "slerp" and len(models) != 2:
            found.append(f"--method slerp: interpolates exactly 2 models, got {len(models)}")
        if method == "linear" and len(models) == 1 and self.liti is None:
            found.append("--method linear with one model: nothing to merge (add models, or --liti with --base)")
        if (method in NEEDS_BASE or self.liti is not None) and self.base is None:
            found.append(f"--base: required for {'--liti' if self.liti is not None else '--method ' + method} (the "
                         "initialisation the task vectors are taken from)")
        if self.t is not None and not 0.0 <= self.t <= 1.0:
            found.append(f"--t {self.t}: must be in [0, 1]")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            found.append(f"--density {self.density}: must be in (0, 1]")
        if weights is not None:
            if method == "slerp":
                found.append("--weights: SLERP takes --t, not weights")
            elif finite_weights and len(weights) != len(models):  # (non-finite weights are said above)
                found.append(f"--weights: {len(weights)} given for {len(models)} models")
            elif finite_weights and method == "linear" and sum(weights) <= 0:
                found.append("--weights: must sum to a positive number")
        return found

    @property
    def slerp_t(self) -> float:
        """SLERP's factor, 0.5 when not given."""
        return 0.5 if self.t is None else self.t

    @property
    def kept_density(self) -> float:
        """TIES/DARE's density, 0.5 when not given."""
        return 0.5 if self.density is None else self.density


def same_location(models: list[str]) -> list[str]:
    """The inputs named twice (local folders compared by resolved path)."""
    from pathlib import Path

    seen: dict[str, str] = {}
    twice = []
    for m in models:
        path = Path(m).expanduser()
        key = str(path.resolve()) if path.exists() else m
        if key in seen:
            twice.append(m)
        seen.setdefault(key, m)
    return twice


def check(schema: type[Request], options: dict[str, tuple[str, Any]], command: str) -> Request:
    """Validate a command's options: {flag as typed: (field, value)}. Returns the request; raises ConfigError
    with every problem (the schema's, then its rules), each naming its flag, under "`command`: invalid options"."""
    flag_of = {field: flag for flag, (field, _) in options.items()}
    values = {field: value for field, value in options.values()}
    try:
        request = schema.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            got = err.get("input")
            problems.append(f"{flag_of.get(field, field)} {got!r}: {err['msg']}" if field else err["msg"])
        raise OptionsError(command, problems) from None
    problems = request.problems()
    if problems:
        raise OptionsError(command, problems)
    return request


class OptionsError(ConfigError):
    """Problems with a command's options, each naming its flag: exit 2."""

    def __init__(self, command: str, problems: list[str]):
        super().__init__(problems)
        self.message = f"{command}: invalid options:\n" + "\n".join(f"  - {p}" for p in self.problems)
        self.args = (self.message,)
