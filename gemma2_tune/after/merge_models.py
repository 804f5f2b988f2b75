"""`gemma2-tune merge-models`: merge several fine-tuned Gemma models with mergekit (linear, SLERP, TIES, DARE,
task arithmetic), optionally followed by LITI, the way Gemma 2's instruction-tuned models were finished.

WARP (Ramé et al., 2024, arXiv:2406.16768; the Gemma 2 report, arXiv:2408.00118, section 4): an EMA of each
policy during fine-tuning (training.ema_decay), SLERP of several policies, then Linear Interpolation Towards
Initialisation: theta = base + eta * (theta_merged - base) = eta * theta_merged + (1 - eta) * base.

The merge itself is mergekit's (its Python API: MergeConfiguration + run_merge). This module resolves the
inputs (run folders with an adapter are merged into their base first, as `merge` does; the EMA folder of a
run, merged folders, full fine-tunes and hub ids are used as they are), checks before any weight is read that
they are of one family with identical shapes and vocabulary, writes mergekit's configuration, and finishes
the output as a model to serve: eager attention and the family's soft-caps in config.json, the chat template
generated for the inputs' system policy, a generation config that stops at <end_of_turn>, merge.json, and a
self-check of the written folder. Image + text checkpoints (Gemma 3 4B+, Gemma 4) merge their language model the
same way, their towers carried unchanged (after/merge_towers.py). Reward models (reward runs, their merges) merge
the same way, their score heads averaged like any tensor (WARM: Ramé et al. 2024, arXiv:2401.12187); one is never merged with a causal LM.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config.requests import MergeModelsRequest
from ..errors import UserError
from ..files import staged_dir, writable_problem

# config.json keys that must be equal for tensors to be merged position by position
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "sliding_window", "tie_word_embeddings")
# Self-check bounds on logits (the merged model vs a model it must equal): float32 merges are exact up to the
# arithmetic's rounding; bf16 logits near Gemma 2's 30.0 soft-cap are spaced 0.125 apart (as in `merge`).
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}


@dataclass
class MergeInput:
    """One model named on the command line, resolved without reading weights."""

    given: str  # as typed
    key: str  # "--models[1]", "--base"
    kind: str  # "run (LoRA adapter)", "model folder", "hub"
    location: str  # what mergekit reads (a folder or hub id); an adapter run's merged folder once prepared
    family: Any = None
    config: Any = None  # transformers config
    system_policy: str | None = None  # from the run's config.yaml or a merge's merge.json
    dtype: str | None = None
    vocab_digest: str = ""
    adapter: bool = False
    adapter_merge: dict[str, Any] | None = None  # `merge`'s report when an adapter was merged into its base
    head: str = "causal-lm"  # "sequence-classification": a reward model (its score head is merged like any tensor)
    text_view: str | None = None  # an image + text checkpoint: its decoder-only view, what mergekit merges

    @property
    def source(self) -> str:
        """What mergekit reads."""
        return self.text_view or self.location

    def describe(self) -> dict[str, Any]:
        """For merge.json."""
        described = {"given": self.given, "kind": self.kind, "head": self.head, "system_policy": self.system_policy,
                     "dtype": self.dtype}
        if self.adapter_merge is not None:
            described["adapter_merged_into_base"] = {k: self.adapter_merge.get(k) for k in (
                "base_model", "merged_dtype", "trained_in_4bit", "check", "trained_model_check")}
        return described


@dataclass
class MergePlan:
    """What the user asked for, checked."""

    method: str
    models: list[MergeInput]
    base: MergeInput | None
    t: float = 0.5
    weights: list[float] | None = None
    density: float = 0.5
    liti: float | None = None
    dtype: str = "bfloat16"
    seed: int = 42
    stages: list[dict[str, Any]] = field(default_factory=list)  # the mergekit configurations that ran
    first_stage: str | None = None  # the method's result before LITI, when LITI follows
    towers: bool = False  # image + text checkpoints: mergekit merges the decoder-only views, the towers are carried


def merge_models(request: MergeModelsRequest, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Merge `request.models` by `request.method` (then LITI towards `request.base` by `request.liti`) into the
    new folder `request.output` (config/requests.py says what each option means; its rules have been checked).
    `dtype`: of the merged weights (default: the inputs' precision). Returns the report (also output/merge.json).
    Raises UserError: an existing output, an output inside an input, inputs of different families, shapes or
    vocabularies, mergekit missing, or a failed self-check (nothing is written then).
    """
    out = Path(request.output).expanduser()
    plan = check_request(request, out)
    try:
        import mergekit  # noqa: F401
    except ImportError:
        raise UserError("merge-models needs mergekit: pip install 'gemma2-tune[merge]' (or mergekit)") from None
    inputs = plan.models + ([plan.base] if plan.base else [])
    policy = system_policy(inputs)
    echo(f"merging {len(plan.models)} model(s) by {plan.method}" + (f", then LITI towards the base (eta {plan.liti})"
                                                                     if plan.liti is not None else "")
         + f" in {plan.dtype}; template for system policy '{policy}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.inputs.", dir=out.parent))
    try:
        for item in inputs:
            if item.adapter:
                prepare_adapter(item, work, plan.dtype, echo)
        carried = None
        if plan.towers:
            from .merge_towers import stage_inputs

            first, _ = stage_inputs(inputs, work, plan.models[0].family, echo)
        with staged_dir(out) as tmp:
            if plan.towers:
                from .merge_towers import assemble

                run_stages(plan, work, work / "merged-decoder")
                carried = assemble(work / "merged-decoder", first, tmp, plan.dtype) | {"from": plan.models[0].given}
            else:
                run_stages(plan, work, tmp)
            tokenizer = finish_folder(tmp, plan.models[0], policy)
            check = self_check(plan, tmp, tokenizer, policy)
            report = {"method": plan.method, "t": plan.t if plan.method == "slerp" else None,
                      "weights": plan.weights, "density": plan.density if plan.method in ("ties", "dare_ties") else None,
                      "liti": plan.liti, "dtype": plan.dtype, "seed": plan.seed, "system_policy": policy,
                      "models": [m.describe() for m in plan.models],
                      "base": plan.base.describe() if plan.base else None, "family": plan.models[0].family.key,
                      "mergekit": {"version": _version("mergekit"), "stages": plan.stages}, "check": check}
            if carried is not None:
                report["towers"] = carried
            (tmp / "merge.json").write_text(json.dumps(report, indent=2) + "\n")
            if not check["passed"]:
                raise UserError(f"merge-models self-check failed: {check['failure']}; nothing was written to {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    echo(f"merged: {out}/ ({plan.dtype})")
    for line in check["lines"]:
        echo(f"  {line}")
    return report


def check_request(request: MergeModelsRequest, out: Path) -> MergePlan:
    """The output folder and the inputs, before any weight is read (the options' own rules were checked by the
    request's schema). Raises UserError."""
    problems = request.problems()  # a request built without config.requests.check: its rules here too
    if problems:
        raise UserError("merge-models:\n" + "\n".join(f"  - {p}" for p in problems))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out}: already exists and is not empty; choose a new folder (nothing was written)")
    problem = writable_problem(out)
    if problem:
        raise UserError(f"--output {out}: cannot create it ({problem})")
    models, base = request.models, request.base
    named = {"--base": base} if base else {}
    named |= {f"--models[{i + 1}]": m for i, m in enumerate(models)}
    inside = [f"{k} {v}" for k, v in named.items() if _overlaps(out, v)]
    if inside:
        raise UserError(f"--output {out}: is, holds or lies inside an input ({', '.join(inside)}); choose a folder "
                        "outside them (nothing was written)")
    resolved = [resolve_input(m, f"--models[{i + 1}]") for i, m in enumerate(models)]
    base_input = resolve_input(base, "--base") if base else None
    check_compatible(resolved + ([base_input] if base_input else []))
    dtype = request.dtype or resolved[0].dtype or "bfloat16"
    from .merge_towers import has_towers

    return MergePlan(request.method, resolved, base_input, request.slerp_t, request.weights, request.kept_density,
                     request.liti, dtype, request.seed, towers=has_towers(resolved[0].config, resolved[0].family))


def _overlaps(out: Path, given: str) -> bool:
    """`out` is the local input `given`, inside it, or holds it."""
    path = Path(given).expanduser()
    if not path.exists():
        return False
    a, b = out.resolve(), path.resolve()
    return a == b or b in a.parents or a in b.parents


def resolve_input(given: str, key: str) -> MergeInput:
    """What one name points at (config and tokenizer only, no weights). Raises UserError naming `key`."""
    try:
        return _resolve_input(given, key)
    except UserError as exc:
        if exc.message.startswith(key):
            raise
        raise UserError(f"{key} {given}: {exc.message}") from None


def _resolve_input(given: str, key: str) -> MergeInput:
    """What one name points at (config and tokenizer only, no weights). Raises UserError."""
    from ..models.checks import vocabulary_digest
    from ..models.loading import checkpoint_family, load_tokenizer, model_location
    from .inference import read_run, saved_policy

    from ..config.rules import sequence_classifier

    path = Path(given).expanduser()
    policy = dtype = None
    adapter = False
    head = "causal-lm"
    if path.is_dir():
        run = read_run(given, None, key=key)
        policy = saved_policy(path, run.config)
        dtype = run.config.model.dtype if run.config else None
        adapter, config_source, location, head = run.is_adapter, run.base_model, str(path), run.head
        kind = "run (LoRA adapter)" if adapter else "run (full fine-tune)" if run.config else "model folder"
    elif path.exists():
        raise UserError(f"{key} {given}: a file; give a model or run folder, or a hub id")
    else:
        from ..config.rules import local_path_problem
        from ..config.runs import missing_folder

        missing = missing_folder(given, bare_names=True)
        if missing:
            raise UserError(f"{key} {given}: {missing}")
        problem = local_path_problem(given, key)
        if problem:
            raise UserError(problem)
        config_source, kind, location = given, "hub" if ":" not in given else "builtin", model_location(given)
    family, hf_config = checkpoint_family(config_source)
    if not adapter and sequence_classifier(getattr(hf_config, "architectures", None)):
        head = "sequence-classification"  # a merged reward model, or one from the hub
    tokenizer = load_tokenizer(str(path) if (path / "tokenizer.json").is_file() else config_source, family=family)
    if dtype is None:
        saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        dtype = str(saved).replace("torch.", "") if saved is not None else None
        dtype = dtype if dtype in ("bfloat16", "float16", "float32") else None
    return MergeInput(given, key, kind, location, family, hf_config, policy, dtype,
                      vocabulary_digest(tokenizer), adapter, head=head)


def check_compatible(inputs: list[MergeInput]) -> None:
    """One family, one head (causal LMs, or reward models: weight-averaged reward models, Ramé et al. 2024,
    arXiv:2401.12187), identical shapes (of the decoder: an image + text checkpoint's text_config), one vocabulary.
    Raises UserError listing every difference."""
    first, problems = inputs[0], []
    heads = {"causal-lm": "a causal LM", "sequence-classification": "a reward model (sequence classifier)"}
    for other in inputs[1:]:
        if other.head != first.head:
            problems.append(f"{other.key} {other.given} is {heads[other.head]}, {first.key} {first.given} is "
                            f"{heads[first.head]}")
            continue
        if other.family.key != first.family.key:
            problems.append(f"{other.key} {other.given} is {other.family.display}, {first.key} {first.given} is "
                            f"{first.family.display}")
            continue
        shapes = [f"{k} {shape(first, k)} vs {shape(other, k)}" for k in SHAPE_KEYS
                  if shape(first, k) != shape(other, k)]
        if shapes:
            problems.append(f"{other.key} {other.given} has another shape than {first.key} {first.given}: "
                            + ", ".join(shapes))
        elif other.vocab_digest != first.vocab_digest:
            problems.append(f"{other.key} {other.given} has another tokenizer vocabulary than {first.key} {first.given}")
    if any(i.head != first.head for i in inputs) and any(i.key == "--base" for i in inputs):
        problems.append("reward models merge by weight averaging (--method linear or slerp, no --base); ties, "
                        "dare_ties, task_arithmetic and --liti take task vectors from a --base of the same kind: a "
                        "reward model (e.g. the one they all started from), not a causal LM")
    if problems:
        raise UserError("merge-models: these models cannot be merged (nothing was read beyond configs and "
                        "tokenizers):\n" + "\n".join(f"  - {p}" for p in problems))


def shape(item: MergeInput, key: str):
    """A shape key of the input's decoder; model_type of the whole checkpoint (an image + text checkpoint is
    merged with its own kind only). Read from the saved dict: Gemma 4's config refuses attribute access to keys that
    vary by layer (head_dim)."""
    from ..models.checks import text_config

    return (item.config if key == "model_type" else text_config(item.config)).to_dict().get(key)


def system_policy(inputs: list[MergeInput]) -> str:
    """The system-message policy the output's template is generated for: the one the runs among the inputs
    trained with (UserError when they differ); "fold" when none says."""
    said = {m.system_policy for m in inputs if m.system_policy}
    if len(said) > 1:
        detail = ", ".join(f"{m.given}: {m.system_policy}" for m in inputs if m.system_policy)
        raise UserError(f"merge-models: the inputs were trained with different data.system_policy ({detail}); one "
                        "served template can't render for both")
    return said.pop() if said else "fold"


def prepare_adapter(item: MergeInput, work: Path, dtype: str, echo: Callable[[str], None]) -> None:
    """A run with a LoRA adapter: its base + adapter merged (and self-checked) by `merge`, into `work`."""
    from .merge import merge

    target = work / f"input-{len(list(work.iterdir()))}"
    echo(f"{item.key} {item.given}: merging the adapter into its base first ({dtype})")
    item.adapter_merge = merge(item.location, str(target), dtype=dtype, echo=lambda line: echo(f"  {line}"))
    item.location = str(target)


def run_stages(plan: MergePlan, work: Path, out: Path) -> None:
    """The method's mergekit merge, then the LITI interpolation (one more linear merge) when asked."""
    locations = [m.source for m in plan.models]
    needs_first_stage = not (plan.method == "linear" and len(locations) == 1)
    if plan.liti is None:
        _mergekit(plan, method_config(plan, locations), out)
        return
    merged = locations[0]
    if needs_first_stage:
        merged = plan.first_stage = str(work / "stage-1")
        _mergekit(plan, method_config(plan, locations), Path(merged))
    liti = {"merge_method": "linear", "parameters": {"normalize": False}, "dtype": plan.dtype,
            "models": [{"model": merged, "parameters": {"weight": plan.liti}},
                       {"model": plan.base.source, "parameters": {"weight": 1.0 - plan.liti}}]}
    _mergekit(plan, liti, out)


def method_config(plan: MergePlan, locations: list[str]) -> dict[str, Any]:
    """mergekit's configuration (as its YAML would say) for the method's stage."""
    n = len(locations)
    weights = plan.weights or [1.0 / n if plan.method == "linear" else 1.0] * n
    cfg: dict[str, Any] = {"merge_method": plan.method, "dtype": plan.dtype}
    if plan.method == "slerp":
        cfg |= {"base_model": locations[0], "models": [{"model": m} for m in locations],
                "parameters": {"t": plan.t}}
    elif plan.method == "linear":
        cfg |= {"models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(locations, weights)],
                "parameters": {"normalize": True}}
    else:
        per_model = {"weight": None}
        if plan.method in ("ties", "dare_ties"):
            per_model["density"] = plan.density
        cfg |= {"base_model": plan.base.source,
                "models": [{"model": m, "parameters": per_model | {"weight": w}} for m, w in zip(locations, weights)]}
    return cfg


def _mergekit(plan: MergePlan, config: dict[str, Any], out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    plan.stages.append(_readable(config, plan))
    try:
        merge_config = MergeConfiguration.model_validate(config)
        run_merge(merge_config, str(out), MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                                                       random_seed=plan.seed, allow_crimes=False))
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"mergekit refused the merge: {str(exc).splitlines()[0][:300]}") from None


def _readable(config: dict[str, Any], plan: MergePlan) -> dict[str, Any]:
    """The stage as recorded: models named as the user gave them (not by their temporary folders)."""
    names = {m.source: m.given for m in plan.models + ([plan.base] if plan.base else [])}
    if plan.first_stage:
        names[plan.first_stage] = "<the first stage's result>"

    def named(value):
        if isinstance(value, dict):
            return {k: named(v) for k, v in value.items()}
        if isinstance(value, list):
            return [named(v) for v in value]
        return names.get(value, value) if isinstance(value, str) else value

    return named(config)


def finish_folder(folder: Path, first: MergeInput, policy: str):
    """The merged folder as a model to serve: eager attention and soft-caps in config.json, the tokenizer with
    the generated chat template, a generation config that stops at <end_of_turn> (not for a reward model).
    Returns the tokenizer."""
    from transformers import GenerationConfig

    from ..data.template import use_run_template
    from ..models.loading import load_tokenizer
    from ..models.serving import stop_ids
    from ..models.tokenizer_files import save_tokenizer

    family = first.family
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["attn_implementation"] = "eager"  # from_pretrained anywhere keeps the soft-caps
    decoder = config.get("text_config") or config  # an image + text checkpoint's decoder reads its text_config
    if family.attention_softcap is not None:
        decoder["attn_logit_softcapping"] = family.attention_softcap
    if family.final_softcap is not None:
        decoder["final_logit_softcapping"] = family.final_softcap
    config["use_cache"] = decoder["use_cache"] = True
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    source = first.location if (Path(first.location) / "tokenizer.json").is_file() else (
        first.config._name_or_path or first.location)
    tokenizer = load_tokenizer(source)
    use_run_template(tokenizer, family, policy, "bad_row")
    save_tokenizer(tokenizer, folder)
    if first.head != "causal-lm":  # a reward model scores and does not generate
        return tokenizer
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=stop_ids(tokenizer))
    generation.save_pretrained(str(folder))
    return tokenizer


def identity_reference(plan: MergePlan) -> tuple[str, str] | None:
    """(what, folder) the merge must equal when its recipe implies one (else None): LITI 0 -> the base; SLERP
    at t=0 or t=1 -> that endpoint; a linear merge of copies of one model -> that model."""
    if plan.liti is not None:
        if plan.liti == 0.0:
            return "the base (LITI eta 0)", plan.base.location
        if plan.liti == 1.0:
            return "the merge before LITI (eta 1)", plan.first_stage or plan.models[0].location
        return None
    if plan.method == "slerp" and plan.t in (0.0, 1.0):
        chosen = plan.models[int(plan.t)]
        return f"{chosen.key} (SLERP at t={plan.t:g})", chosen.location
    if plan.method == "linear" and len({weights_digest(m.location) for m in plan.models}) == 1:
        return "the model merged with copies of itself", plan.models[0].location
    return None


def weights_digest(location: str) -> str | None:
    """sha256 over a local folder's *.safetensors (None for a hub id)."""
    path = Path(location)
    if not path.is_dir():
        return location
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def self_check(plan: MergePlan, folder: Path, tokenizer, policy: str) -> dict[str, Any]:
    """Reload the written folder through the checked loading path (eager, soft-caps), score a few chats:
    logits finite; equal to the model the recipe implies, when it implies one (TOLERANCE)."""
    import torch

    from ..models.loading import LoadRequest, load_model
    from . import selfcheck

    family, head = plan.models[0].family, plan.models[0].head
    merged, report = load_model(LoadRequest(str(folder), dtype=plan.dtype, attn_implementation="eager", head=head))
    prompts = selfcheck.prompts(tokenizer, policy, family)
    got = selfcheck.logits(merged, prompts)
    del merged
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    outputs = "logits" if head == "causal-lm" else "scores"  # a reward model: one score per chat
    check: dict[str, Any] = {"loads": True, "attention": "eager", "logits_finite": finite, "passed": finite,
                             "lines": [f"reloaded with eager attention: {outputs} finite on {len(prompts)} chats: "
                                       f"{'yes' if finite else 'NO'}"], "failure": None}
    if not finite:
        check["failure"] = f"the merged model's {outputs} are not finite"
    reference = identity_reference(plan)
    if reference is not None and finite:
        what, location = reference
        other, _ = load_model(LoadRequest(location, dtype=plan.dtype, attn_implementation="eager", head=head))
        expected = selfcheck.logits(other, prompts)
        del other
        compared = selfcheck.compare(got, expected)
        bound = TOLERANCE[plan.dtype]
        ok = compared["max_abs_logit_diff"] <= bound
        check |= {"equals": what, "max_abs_logit_diff": compared["max_abs_logit_diff"], "tolerance": bound,
                  "top1_agreement": compared["top1_agreement"], "passed": ok}
        check["lines"].append(f"equals {what}: max |logit difference| {compared['max_abs_logit_diff']:.2e} "
                              f"(tolerance {bound})")
        if not ok:
            check["failure"] = (f"the recipe implies the result equals {what}, but the logits differ by "
                                f"{compared['max_abs_logit_diff']:.4f} (tolerance {bound})")
    return check


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
