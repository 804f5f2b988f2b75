"""`gemma2-tune export`: the tuned model as one GGUF file for llama.cpp and Ollama, proven to answer as trained.

    run / ema/ / merged folder / merge-models output
      -> model folder (an adapter is merged into its base first, self-checked: `merge` through serve's path)
      -> llama.cpp's own converter (convert_hf_to_gguf.py, from the llama-cpp-python source distribution of the
         installed version) writes f32/f16/bf16; every quantized type (q8_0, k-quants, legacy quants) is made from
         its output, in the weights' own precision, by llama.cpp's quantizer (llama_model_quantize, through
         llama-cpp-python)
      -> read back with `gguf`: our chat template (the run's family and system policy), <end_of_turn> ending
         generation, one <bos>, soft-caps and sliding window, the Gemma terms where the weights carry them
      -> parity with transformers on fixed prompts rendered by our template (after/gguf_parity.py: prompt ids
         equal; f32/f16/bf16 greedy continuations equal; a quantized file's KL divergence and max |logit
         difference| within floors measured on the same positions)
      -> only then: FILE.gguf, FILE.export.json (the report) and, with --ollama, FILE.Modelfile

Needs `pip install 'gemma2-tune[export]'` (llama-cpp-python, which compiles llama.cpp on install; gguf;
sentencepiece).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data.template import chat_template
from ..data.turns import BOS, end_of_turn
from ..errors import UserError
from ..families import Family
from ..files import writable_problem
from .gguf_parity import PARITY_PROMPTS, check_parity
from .image_prompt import check_image_prompt
from .projector import (NOT_CHECKED, NOT_WRITTEN, PROJECTOR_TYPES, check_image_embeddings, check_projector,
                        processor_settings, write_projector)

# llama.cpp's converter writes the unquantized types; every other type is quantized from its output by llama.cpp's
# quantizer (as llama.cpp's own workflow does: convert, then llama-quantize), whose input is then the floor of the
# parity bound (after/gguf_parity.py).
CONVERTER_TYPES = ("f32", "f16", "bf16")
# llama.cpp's llama_ftype values (include/llama.h) of q8_0, the k-quants and the legacy quants that need no
# importance matrix; the i-quants (iq*) need one and are not offered.
QUANTIZER_TYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
                   "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
QUANT_TYPES = CONVERTER_TYPES + tuple(QUANTIZER_TYPES)

GEMMA_TERMS = {"license": "gemma", "license_name": "Gemma Terms of Use",
               "license_link": "https://ai.google.dev/gemma/terms"}
# The notice the Gemma Terms of Use (section 3.1) ask to be distributed with the model.
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"

EXTRA_HINT = "pip install 'gemma2-tune[export]' (llama-cpp-python compiles llama.cpp on install: minutes)"
LLAMA_CPP_ENV = "GEMMA2_TUNE_LLAMA_CPP"  # a llama.cpp source tree whose converter to use instead
# Why --ollama is refused for Gemma 4 (after/ollama.py writes Gemma 2/3's turns only).
OLLAMA_GEMMA4 = ("no Modelfile is written for Gemma 4: Ollama renders a conversation with its Modelfile's Go template "
                 "over its own message fields (tools, tool calls, thinking), and a Go template reproducing Gemma 4's "
                 "turns exactly (native system turn, the thought channel, tool declarations/calls/responses with "
                 "sorted keys and <|\"|> strings, the size-dependent empty thought block) is not written or tested "
                 "here; export without --ollama and run the GGUF with llama.cpp (llama-server --jinja applies the "
                 "GGUF's own template, ours)")


@dataclass
class Exported:
    """What export wrote: the GGUF, its report, the Modelfile (None without --ollama)."""

    gguf: Path
    report: Path
    modelfile: Path | None
    result: dict


def export(target: str, *, to: str = "gguf", quant: str = "f16", output: str, overwrite: bool = False,
           ollama: bool = False, echo: Callable[[str], None] = print) -> Exported:
    """Export `target` (a run folder, its ema/, a merged or merge-models folder) to one GGUF file `output`.

    `quant`: one of QUANT_TYPES. `output` may be relative (to the working directory). Writes `output` (bytes: about
    2 per parameter in f16, ~1.06 in q8_0), beside it `<stem>.export.json` (the checks and parity numbers) and,
    with `ollama`, `<stem>.Modelfile` (without it, a Modelfile there from an earlier export is removed: it would
    describe another file) and, for a Gemma 3 image + text model with its image processor, `<stem>.mmproj.gguf`
    (llama.cpp's projector file, after/projector.py); all of it only after every check passed. Raises UserError (nothing written): an
    unknown `to` or `quant`, an output that is not a .gguf path, lies under a file or where nothing may be
    written, or exists (any of the three files) without `overwrite`, a target that is not a Gemma 2 / 3 / 4
    model folder or run (an image + text model exports its decoder; Gemma 4's 12B is refused, and so is `ollama`
    for Gemma 4: OLLAMA_GEMMA4), a Gemma 2 without a SentencePiece model, a Gemma 4 whose tokenizer.json is not a
    BPE with byte fallback, the export extra missing, the converter failing, a metadata check or a parity bound
    failing.
    """
    if to != "gguf":
        raise UserError(f"--to {to}: the only export format is gguf (llama.cpp, Ollama)")
    quant = quant.lower()
    if quant not in QUANT_TYPES:
        raise UserError(f"--quant {quant}: not a llama.cpp type offered here; use one of {', '.join(QUANT_TYPES)}")
    # absolute: the converter runs in a work folder beside the output, so a relative path would name another file
    out = Path(output).expanduser().absolute()
    if out.suffix != ".gguf":
        raise UserError(f"--output {output}: give a file name ending in .gguf")
    # the export is these three files, replaced together: a Modelfile left beside a new GGUF would give it the old
    # one's template and parameters at `ollama create` (FROM ./FILE.gguf), so without --ollama it is removed
    outputs = [out, _beside(out, ".export.json"), _beside(out, ".Modelfile")]
    if out.is_dir():
        raise UserError(f"--output {output}: is a folder; give a file name ending in .gguf")
    problem = writable_problem(out.parent)
    if problem:
        raise UserError(f"--output {output}: cannot write there ({problem}); nothing was written")
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace (nothing was written)")
    missing = missing_packages()
    if missing:
        raise UserError(f"export needs the package(s) {', '.join(missing)}: {EXTRA_HINT}; nothing was written")
    family, sentencepiece = _check_target(target)
    if ollama and family.turn_format == "gemma4":
        raise UserError(f"export {target} --ollama: {OLLAMA_GEMMA4}; nothing was written")
    projector_file = _beside(out, ".mmproj.gguf") if family.key in PROJECTOR_TYPES | NOT_WRITTEN else None
    if projector_file and projector_file.exists() and not overwrite:
        raise UserError(f"{projector_file} already exists; pass --overwrite to replace (nothing was written)")

    from .materialize import model_folder

    started = time.time()
    with model_folder(target, command="export", echo=echo) as served:
        folder = served.folder
        template, policy, unsupported, note = _run_template(folder, served)
        if note:
            echo(note)
        terms = _carries_gemma_terms(target, folder)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None) as tmp:
            work = Path(tmp)
            gguf_file = work / out.name
            config = _saved_config(folder)
            converted = _convert(folder, config, template, quant, work, gguf_file, terms, sentencepiece, echo)
            metadata = read_metadata(gguf_file)
            checks = check_metadata(metadata, template, config, served.family, terms)
            _require(checks, "the GGUF", out)
            echo(f"GGUF metadata checked: {', '.join(c['check'] for c in checks)}")
            if projector_file and "vision_config" not in config:
                projector_file = None  # a text-only checkpoint of a family with image + text sizes
            # the image prompt's greedy tokens are held to transformers' on an unquantized file, as the text
            # prompts' are (after/gguf_parity.py): the quantizer's input where the output is quantized
            exact_file = Path(converted["unquantized"]) if "unquantized" in converted else gguf_file
            projector = (_projector(folder, config, served.family, quant, work, exact_file, projector_file, policy,
                                    echo) if projector_file else None)
            unquantized = converted.pop("unquantized", None)
            parity = check_parity(gguf_file, folder, served.family, policy, template, quant, echo,
                                  Path(unquantized) if unquantized else None, converted["outtype"],
                                  empty_thought(folder, served.family))
            if unquantized:
                Path(unquantized).unlink()  # before the move: the output's folder holds one model file at a time
            result = {
                "source": str(served.source), "family": served.family.key, "system_policy": policy,
                "unsupported_fields": unsupported, "quant": quant, "converter": converted,
                "gguf": {"file": out.name, "bytes": gguf_file.stat().st_size, "tensors": _tensor_count(gguf_file),
                         "metadata": _summary(metadata)},
                "checks": checks, "parity": parity, "gemma_terms": GEMMA_NOTICE if terms else None,
                "seconds": round(time.time() - started, 1),
            } | ({"projector": projector} if projector_file else {})
            (work / "export.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
            if not parity["passed"]:
                raise UserError(f"parity self-check failed ({parity['bound']['rule']}): {parity['failure']}; "
                                f"nothing was written to {out}")
            if ollama:
                from .inference import Sampling
                from .ollama import modelfile

                sampling = Sampling()  # what `chat` generates with by default: greedy, 256 new tokens
                params = {"temperature": sampling.temperature, "num_predict": sampling.max_new_tokens}
                (work / "Modelfile").write_text(modelfile(out.name, served.family, policy, params,
                                                          GEMMA_NOTICE if terms else None))
            out.parent.mkdir(parents=True, exist_ok=True)
            # the report and Modelfile before the GGUF: a GGUF in place means its report is too (a rename when
            # the work folder is beside the output, as it is unless the output's folder did not exist)
            shutil.move(work / "export.json", outputs[1])
            if ollama:
                shutil.move(work / "Modelfile", outputs[2])
            elif outputs[2].exists():
                outputs[2].unlink()
                echo(f"removed {outputs[2]}: it described the GGUF this export replaces (--ollama writes a new one)")
            if projector and projector["written"]:
                shutil.move(work / projector_file.name, projector_file)
            elif projector_file and projector_file.exists():  # --overwrite: an older tower's file must not stay
                projector_file.unlink()
            shutil.move(gguf_file, out)
    _print_result(result, outputs if ollama else outputs[:2], echo)
    if projector_file:
        _print_projector(result["projector"], projector_file, echo)
    return Exported(out, outputs[1], outputs[2] if ollama else None, result)


def _beside(gguf: Path, suffix: str) -> Path:
    return gguf.with_name(gguf.name[: -len(".gguf")] + suffix)


def missing_packages() -> list[str]:
    """Which packages of the export extra are not installed."""
    import importlib.util

    modules = {"llama-cpp-python": "llama_cpp", "gguf": "gguf", "sentencepiece": "sentencepiece"}
    return [name for name, module in modules.items() if importlib.util.find_spec(module) is None]


def _check_target(target: str) -> tuple[Family, Path | None]:
    """Refuse, before any merge or conversion, what is not a Gemma model folder or run, is a reward model, is of
    a family not exported yet, or is a Gemma 2 without a SentencePiece model. Returns the checkpoint's family and
    the tokenizer's SentencePiece model (None: it has none)."""
    from ..models.loading import checkpoint_family, turn_format_problem
    from .inference import read_run

    path = Path(target).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise UserError(f"export {target}: {what} (give a run folder, its ema/ folder, or a merged folder)")
    run = read_run(str(path), None, key="export")
    run.require_generating("export")  # llama.cpp runs language models; a reward model's score head is not one
    family, _ = checkpoint_family(run.base_model)  # UserError for Gemma 1, other architectures
    problem = turn_format_problem(family)  # before any merge: the GGUF's template and parity prompts are turns
    if problem:
        raise UserError(f"export {target}: {problem}")
    if family.turn_format == "gemma4" and family.key != "gemma4":
        raise UserError(f"export {target}: {family.display} is not exported yet (llama.cpp's converter for its "
                        "decoder is not proven here by a parity check); serve it with `gemma2-tune serve`")
    if family.turn_format == "gemma4":
        problem = _llama_bpe_problem(path, run)
        if problem:
            raise UserError(f"export {target}: {problem}; nothing was written")
    sentencepiece = _sentencepiece(path, run)
    if sentencepiece is None and family.key == "gemma2":
        base = f" nor its base {run.base_model}" if run.is_adapter else ""
        raise UserError(f"export {target}: llama.cpp's Gemma 2 converter reads the vocabulary from the tokenizer's "
                        f"SentencePiece model (tokenizer.model), and neither {target}{base} has one (a byte-level "
                        "BPE tokenizer, as builtin:tiny-gemma2's, cannot be converted; for a folder written without "
                        "it, copy its base's tokenizer.model into it); nothing was written")
    return family, sentencepiece


def _llama_bpe_problem(path: Path, run) -> str | None:
    """Why llama.cpp's Gemma 4 converter cannot read this folder's tokenizer, or None. It reads tokenizer.json as a
    Llama-style BPE (gguf-py's LlamaHfVocab: model BPE with byte fallback, a Sequence decoder), as Gemma 4's published
    tokenizers are; a byte-level BPE (builtin:tiny-gemma4's) fails there with "Cannot find Llama BPE tokenizer"."""
    where = path if (path / "tokenizer.json").is_file() or not run.is_adapter else Path(run.base_model).expanduser()
    try:
        tokenizer = json.loads((where / "tokenizer.json").read_text())
        model, decoder = tokenizer.get("model") or {}, tokenizer.get("decoder") or {}
    except (OSError, ValueError, AttributeError):
        return f"llama.cpp's Gemma 4 converter reads the tokenizer from tokenizer.json, and {where} has none readable"
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder.get("type") == "Sequence":
        return None
    found = (f"{model.get('type')} model, byte_fallback {model.get('byte_fallback')}, decoder {decoder.get('type')}")
    return (f"llama.cpp's Gemma 4 converter reads tokenizer.json as a BPE with byte fallback (as Gemma 4's published "
            f"tokenizers are), and {where / 'tokenizer.json'} is not one ({found}; builtin:tiny-gemma4's byte-level "
            "BPE cannot be converted)")


def _sentencepiece(path: Path, run) -> Path | None:
    """The SentencePiece model of the folder's tokenizer: its own tokenizer.model (carried by every folder
    gemma2-tune writes), else the one its tokenizer recorded, else (an adapter) its base's."""
    from ..models.loading import load_tokenizer
    from ..models.tokenizer_files import sentencepiece_model

    found = sentencepiece_model(load_tokenizer(str(path))) if (path / "tokenizer.json").is_file() else None
    if found is None and run.is_adapter:
        found = sentencepiece_model(load_tokenizer(run.base_model))
    return found

def _projector(folder: Path, config: dict, family: Family, quant: str, work: Path, gguf_file: Path,
               projector_file: Path, policy: str, echo) -> dict:
    """The image tower's projector file (mmproj) written into `work` and checked (its metadata, a drawn image's
    soft-token embeddings in llama.cpp against transformers', then an image prompt generated through llama.cpp with
    `gguf_file` against transformers' answer: after/image_prompt.py), or why it was not written; `config`: the
    folder's config.json. Raises UserError when the converter fails or a check fails."""
    if family.key in NOT_WRITTEN:
        return {"written": False, "file": None, "why": NOT_WRITTEN[family.key], "not_checked": NOT_CHECKED}
    processor = processor_settings(folder)
    if processor is None:
        return {"written": False, "file": None, "not_checked": NOT_CHECKED,
                "why": f"{folder} has no image processor (preprocessor_config.json or processor_config.json), whose "
                       "resolution and soft tokens per image the projector file must carry"}
    ran = write_projector(converter_dir(), folder, work, work / projector_file.name, quant, echo)
    checks = check_projector(read_metadata(work / projector_file.name), config, processor, family)
    _require(checks, "the projector file", projector_file)
    echo(f"projector metadata checked: {', '.join(c['check'] for c in checks)}")
    embeddings = check_image_embeddings(gguf_file, work / projector_file.name, work / "tower", config, processor)
    if not embeddings["passed"]:
        raise UserError(f"projector self-check failed: {embeddings['failure']}; nothing was written to "
                        f"{projector_file}")
    echo(f"projector parity ({embeddings['bound']}): {embeddings['tokens_llama_cpp']} soft tokens of a "
         f"{embeddings['image']}, cosine similarity >= {embeddings['min_cosine']:.5f}, max |difference| "
         f"{embeddings['max_abs_diff']:.4f} (of values up to {embeddings['max_abs_value']:.2f})")
    prompt = check_image_prompt(gguf_file, work / projector_file.name, folder, family, policy, work)
    if not prompt["passed"]:
        raise UserError(f"image prompt self-check failed ({prompt['bound']}): {prompt['failure']}; nothing was "
                        f"written to {projector_file}")
    echo(f"image prompt parity ({prompt['bound']}): {prompt['prompt_tokens']} prompt tokens ({prompt['soft_tokens_llama_cpp']} "
         f"soft tokens) equal, greedy tokens equal on the first {prompt['greedy_tokens_compared']}; llama.cpp answers "
         f"{prompt['prompt']!r}: {prompt['llama_cpp_answer'].strip()[:80]!r}")
    return {"written": True, "file": projector_file.name, "bytes": (work / projector_file.name).stat().st_size,
            "tensors": _tensor_count(work / projector_file.name), "converter": ran, "checks": checks,
            "image_embeddings": embeddings, "image_prompt": prompt, "not_checked": None}


def _require(checks: list[dict], what: str, target: Path) -> None:
    """Raise UserError naming every failed {check, expected, found, passed} of `what` (nothing written to `target`)."""
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise UserError(f"{what} does not carry what it must: "
                        + "; ".join(f"{c['check']}: {c['found']} (expected {c['expected']})" for c in failed)
                        + f"; nothing was written to {target}")


def _print_projector(projector: dict, projector_file: Path, echo) -> None:
    if projector["written"]:
        echo(f"  projector: {projector_file} ({projector['bytes'] / 2**20:.1f} MiB; llama.cpp: --mmproj "
             f"{projector_file})")
    else:
        echo(f"  projector: not written: {projector['why']}")
    if projector["not_checked"]:
        echo(f"  not checked: {projector['not_checked']}")


def _saved_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _run_template(folder: Path, served) -> tuple[str, str, str, str | None]:
    """(template, system policy, unsupported-fields setting, a note or None) for the GGUF: the run's generated
    template. The folder's saved template tells which variant it was generated as; a folder whose template is
    not one of ours (a checkpoint from elsewhere) gets ours for its policy, said in the note."""
    from ..models.loading import load_tokenizer

    saved = getattr(load_tokenizer(str(folder)), "chat_template", None)
    empty = empty_thought(folder, served.family)
    policies = [served.system_policy] + [p for p in ("fold", "drop", "error") if p != served.system_policy]
    for policy in policies:
        for unsupported in ("bad_row", "ignore"):
            if saved == chat_template(served.family, policy, unsupported, empty_thought=empty):
                return saved, policy, unsupported, None
    ours = chat_template(served.family, served.system_policy, empty_thought=empty)
    return (ours, served.system_policy, "bad_row",
            f"the folder's chat template is not one gemma2-tune generated: the GGUF gets ours ({served.family.display} "
            f"turns, system policy {served.system_policy})")


def empty_thought(folder: Path, family: Family) -> bool:
    """Does the exported model's template write Gemma 4's empty thought block (12B, 26B-A4B, 31B; by its shape in
    config.json, data/gemma4.writes_empty_thought)? False for Gemma 2/3."""
    from ..data.gemma4 import writes_empty_thought

    return writes_empty_thought(family, str(folder))


def _carries_gemma_terms(target: str, folder: Path) -> bool:
    """Do the weights come from Google's Gemma (whose terms travel with them)? Every model does except
    gemma2-tune's random tiny test models (builtin:tiny-*), recognised by their build marker or a run's base."""
    from ..files import COMPLETE

    def tiny(path: Path) -> bool:
        try:
            return str(json.loads((path / COMPLETE).read_text()).get("builtin", "")).startswith("builtin:tiny-")
        except (OSError, ValueError, AttributeError):
            return False

    path = Path(target).expanduser()
    names = []
    for source in (path, folder):
        for file in ("merge.json", "adapter_config.json"):
            try:
                saved = json.loads((source / file).read_text())
            except (OSError, ValueError):
                continue
            names += [saved.get("base_model"), saved.get("base_model_name_or_path")]
            names += [str(m) for m in saved.get("models", []) or []]
    from .inference import saved_config

    cfg = saved_config(path)
    if cfg is not None:
        names.append(cfg.model.name_or_path)
    if tiny(path) or tiny(folder):
        return False
    lineage = [n for n in names if n]
    return not (lineage and all(str(n).startswith("builtin:tiny-") or tiny(Path(str(n))) for n in lineage))


# --- llama.cpp's converter -----------------------------------------------------------------------------------

def converter_dir() -> Path:
    """A folder with llama.cpp's convert_hf_to_gguf.py, its `conversion` package and its gguf-py, matching the
    installed llama-cpp-python: $GEMMA2_TUNE_LLAMA_CPP (a llama.cpp source tree), else extracted once from that
    version's source distribution (pip download: from pip's cache when the extra was just installed) into
    $GEMMA2_TUNE_HOME/llama.cpp/. Raises UserError when neither is possible."""
    import llama_cpp

    from ..files import COMPLETE, home, staged_dir

    env = os.environ.get(LLAMA_CPP_ENV)
    if env:
        tree = Path(env).expanduser()
        if not (tree / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"{LLAMA_CPP_ENV}={env}: no convert_hf_to_gguf.py there (give a llama.cpp source tree)")
        return tree
    version = llama_cpp.__version__
    tree = home() / "llama.cpp" / f"llama-cpp-python-{version}"
    if (tree / COMPLETE).is_file():
        return tree
    with tempfile.TemporaryDirectory() as download:
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={version}", "-d", download], capture_output=True, text=True)
        sdists = list(Path(download).glob("*.tar.gz"))
        if pip.returncode != 0 or not sdists:
            reason = (pip.stderr.strip().splitlines() or ["no source distribution"])[-1][:300]
            raise UserError(f"export needs llama.cpp's converter from llama-cpp-python {version}'s source "
                            f"distribution and could not get it ({reason}); or set {LLAMA_CPP_ENV} to a llama.cpp "
                            "source tree of that version")
        with staged_dir(tree, is_stale=lambda p: not (p / COMPLETE).is_file()) as tmp:
            prefix = f"{sdists[0].name[: -len('.tar.gz')]}/vendor/llama.cpp/"
            wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
            with tarfile.open(sdists[0]) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                           and m.name[len(prefix):].startswith(wanted) and (m.isfile() or m.isdir())]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(tmp, members=members, filter="data")
            if not (tmp / "convert_hf_to_gguf.py").is_file():
                raise UserError(f"llama-cpp-python {version}'s source distribution has no convert_hf_to_gguf.py")
            (tmp / COMPLETE).write_text(json.dumps({"llama-cpp-python": version, "from": sdists[0].name}))
    return tree


def _staged_model(folder: Path, template: str, work: Path, sentencepiece: Path | None) -> Path:
    """The folder as the converter should read it: links to its files, with `template` as the only chat template
    (the converter takes the template it finds beside the tokenizer) and the tokenizer's SentencePiece model (a
    folder written before gemma2-tune carried it has none of its own)."""
    from ..models.tokenizer_files import SENTENCEPIECE_MODEL

    staged = work / "model"
    staged.mkdir()
    carriers = {"chat_template.jinja", "chat_template.json", "tokenizer_config.json"}
    for item in folder.iterdir():
        if item.name not in carriers:
            (staged / item.name).symlink_to(item.resolve())
    if sentencepiece is not None and not (staged / SENTENCEPIECE_MODEL).exists():
        (staged / SENTENCEPIECE_MODEL).symlink_to(sentencepiece.resolve())
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config.pop("chat_template", None)
    if "added_tokens_decoder" not in config:
        # transformers 5 keeps added tokens in tokenizer.json only; llama.cpp's SentencePiece path (Gemma 2) reads
        # them from here, and without it <start_of_turn>/<end_of_turn> would be plain text to llama.cpp's tokenizer
        from ..models.loading import load_tokenizer

        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                     "normalized": t.normalized, "single_word": t.single_word}
            for i, t in load_tokenizer(str(folder)).added_tokens_decoder.items()}
    (staged / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (staged / "chat_template.jinja").write_text(template)
    return staged


def _convert(folder: Path, config: dict, template: str, quant: str, work: Path, gguf_file: Path, terms: bool,
             sentencepiece: Path | None, echo) -> dict:
    """Run llama.cpp's converter (and quantizer) into `gguf_file`; `config`: the folder's config.json. Returns what
    ran. Raises UserError."""
    tree = converter_dir()
    staged = _staged_model(folder, template, work, sentencepiece)
    direct = quant in CONVERTER_TYPES
    saved_dtype = config.get("dtype") or config.get("torch_dtype")
    # quantizer input: the weights' own precision, so quantizing rounds once
    outtype = quant if direct else {"bfloat16": "bf16", "float16": "f16"}.get(saved_dtype, "f32")
    target = gguf_file if direct else work / f"unquantized.{outtype}.gguf"
    metadata = {"general.name": gguf_file.name[: -len(".gguf")]}
    if terms:
        metadata |= {"general.license": GEMMA_TERMS["license"], "general.license.name": GEMMA_TERMS["license_name"],
                     "general.license.link": GEMMA_TERMS["license_link"]}
    (work / "metadata.json").write_text(json.dumps(metadata))
    command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(staged), "--outfile", str(target),
               "--outtype", outtype, "--metadata", str(work / "metadata.json")]
    echo(f"converting with llama.cpp's convert_hf_to_gguf.py ({outtype}) ...")
    started = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    env.pop("NO_LOCAL_GGUF", None)  # the converter uses the gguf-py of its own llama.cpp tree
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])[:600]
        raise UserError(f"llama.cpp's converter failed on {folder}: {tail}")
    ran = {"converter": str(tree / "convert_hf_to_gguf.py"), "outtype": outtype,
           "convert_seconds": round(time.time() - started, 1)}
    if not direct:
        import ctypes

        import llama_cpp

        echo(f"quantizing to {quant} with llama.cpp (llama_model_quantize) ...")
        started = time.time()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANTIZER_TYPES[quant]
        params.nthread = os.cpu_count() or 1
        code = llama_cpp.llama_model_quantize(str(target).encode(), str(gguf_file).encode(), ctypes.byref(params))
        if code != 0 or not gguf_file.is_file():
            raise UserError(f"llama.cpp's quantizer failed ({quant}, code {code})")
        ran |= {"quantizer": "llama_model_quantize", "quantize_seconds": round(time.time() - started, 1),
                "unquantized": str(target)}  # read by parity, removed with the work folder
    return ran


# --- what the GGUF carries ----------------------------------------------------------------------------------

def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's key/value metadata (arrays of strings or numbers as lists; token lists kept whole), read with
    `gguf`'s reader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    values = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        values[key] = field.contents()
    return values


def _tensor_count(path: Path) -> int:
    from gguf import GGUFReader

    return len(GGUFReader(str(path)).tensors)


def _summary(metadata: dict) -> dict:
    """The metadata without the token lists (for the report)."""
    return {k: v for k, v in metadata.items() if not k.startswith("tokenizer.ggml.") or not isinstance(v, list)}


def check_metadata(metadata: dict, template: str, config: dict, family: Family, terms: bool) -> list[dict]:
    """Each fact the GGUF must carry, as {check, expected, found, passed}: our chat template, the family's end of
    turn (<end_of_turn>; Gemma 4: <turn|>, and its stop tokens <eos> <turn|> <|tool_response> as tokens) and <bos>
    as tokens, one <bos> (add_bos_token with a template that writes <bos>: llama.cpp's chat code removes the
    template's when it adds its own), the family's soft-caps and sliding window from the model's config, the
    layer pattern and (Gemma 4) the KV-shared layers as llama.cpp will run them, the Gemma terms where the weights
    carry them."""
    arch = metadata.get("general.architecture")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config = config.get("text_config") or config  # an image + text checkpoint: the GGUF holds its decoder
    checks = []

    def check(name: str, expected: Any, found: Any, passed: bool | None = None) -> None:
        ok = expected == found if passed is None else passed
        checks.append({"check": name, "expected": expected, "found": found if not isinstance(found, str)
                       or len(found) < 200 else found[:200] + "...", "passed": bool(ok)})

    check("architecture", family.gguf_arch, arch)
    check("chat template (ours)", "the run's generated template", "equal" if metadata.get("tokenizer.chat_template")
          == template else "different", metadata.get("tokenizer.chat_template") == template)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    check("<bos> token", BOS, tokens[bos] if isinstance(bos, int) and bos < len(tokens) else None)
    check("one <bos> (add_bos_token)", True, metadata.get("tokenizer.ggml.add_bos_token"))
    end = end_of_turn(family)
    check(f"{end} token", True, end in tokens)
    if family.turn_format == "gemma4":
        from ..families.gemma4_format import STOP_TOKENS

        check("stop tokens (<eos> <turn|> <|tool_response>)", True, all(t in tokens for t in STOP_TOKENS))
    for key, hf_key in (("attn_logit_softcapping", "attn_logit_softcapping"),
                        ("final_logit_softcapping", "final_logit_softcapping"),
                        ("attention.sliding_window", "sliding_window")):
        expected = config.get(hf_key)
        found = metadata.get(f"{arch}.{key}")
        if expected is None and found is None:
            continue
        check(f"{key}", expected, found, expected is not None and found is not None and abs(float(found) - float(expected)) < 1e-6)
    if family.attention_softcap is not None:  # Gemma 2: both caps must be there
        present = {c["check"] for c in checks}
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if key not in present:
                check(key, family.attention_softcap if key.startswith("attn") else family.final_softcap, None, False)
    # llama.cpp's Gemma 2 and 3 scale queries by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the 27B (which it
    # recognises by its layer count: 46, 62), whatever the checkpoint says (src/models/gemma2.cpp, gemma3.cpp); a
    # GGUF has no key for it, so a model with another query_pre_attn_scalar would compute another function there
    layers = config.get("num_hidden_layers")
    if family.turn_format != "gemma4":  # Gemma 4 normalises queries and keys (QK-norm) and scales by 1 in both
        is_27b = layers == {"gemma2": 46, "gemma3": 62}.get(arch)
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        llama_scalar = config["hidden_size"] / config["num_attention_heads"] if is_27b else head_dim
        scalar = config.get("query_pre_attn_scalar", head_dim)
        check("query scale llama.cpp applies", f"query_pre_attn_scalar {llama_scalar:g}",
              f"query_pre_attn_scalar {scalar:g}", abs(float(scalar) - float(llama_scalar)) < 1e-6)
    expected_layers, found_layers = config_layer_pattern(config), llama_layer_pattern(metadata, arch, layers)
    if expected_layers is not None:
        check("sliding/global layers llama.cpp applies", expected_layers, found_layers, expected_layers == found_layers)
    if config.get("num_kv_shared_layers"):
        expected_reuse = config_kv_reuse(config)
        found_reuse = llama_kv_reuse(metadata, arch, found_layers)
        check("KV-shared layers llama.cpp reuses", expected_reuse, found_reuse, expected_reuse == found_reuse)
    if config.get("hidden_size_per_layer_input"):
        check("per-layer embedding width", config["hidden_size_per_layer_input"],
              metadata.get(f"{arch}.embedding_length_per_layer_input"))
    if terms:
        check("Gemma terms of use", GEMMA_TERMS["license_link"], metadata.get("general.license.link"))
    return checks


# llama.cpp's default sliding-window layer pattern when a GGUF has no `{arch}.attention.sliding_window_pattern`:
# every n-th layer global, the others sliding (src/models/gemma2.cpp: 2, gemma3.cpp: 6; llama_hparams::
# set_swa_pattern). Its Gemma 3 converter writes no pattern, so a Gemma 3 with another layer_types than the
# published 5 local : 1 global would attend differently there.
LLAMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}


def config_layer_pattern(config: dict) -> str | None:
    """The model's layers as a string, 's' sliding and 'g' global (from layer_types); None when it has none."""
    types = config.get("layer_types")
    return "".join("s" if t == "sliding_attention" else "g" for t in types) if types else None


def llama_layer_pattern(metadata: dict, arch: str | None, layers: int | None) -> str | None:
    """The layers as llama.cpp will run them ('s'/'g'): the GGUF's sliding_window_pattern (a per-layer array or
    a period), else the architecture's default period (LLAMA_SWA_PATTERN); None when unknown."""
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", LLAMA_SWA_PATTERN.get(arch))
    if isinstance(pattern, list):
        return "".join("s" if x else "g" for x in pattern)
    if not isinstance(pattern, int) or not layers:
        return None
    return "".join("s" if pattern == 0 or il % pattern < pattern - 1 else "g" for il in range(layers))


def config_kv_reuse(config: dict) -> str:
    """The KV-shared layers of a Gemma 4 config as transformers runs them: "LAYER<-SOURCE" for each, the source
    being the last layer before the shared ones of the same kind (sliding or global), comma-separated."""
    types = config["layer_types"]
    first = config["num_hidden_layers"] - config["num_kv_shared_layers"]
    reuse = {il: max((j for j in range(first) if types[j] == types[il]), default=None)
             for il in range(first, config["num_hidden_layers"])}
    return ",".join(f"{il}<-{src}" for il, src in reuse.items())


def llama_kv_reuse(metadata: dict, arch: str | None, pattern: str | None) -> str | None:
    """The KV-shared layers as llama.cpp runs them ("LAYER<-SOURCE", `config_kv_reuse`'s form): a shared sliding
    layer reads the cache of the second-to-last layer before the shared ones, a shared global layer the last one's,
    whatever their kinds (src/llama-model.cpp, create_memory, Gemma 3n/Gemma 4). A source of another kind than its
    layer is not in that kind's cache: llama.cpp aborts loading the file (GGML_ASSERT in llama-kv-cache.cpp), so
    the check must fail before llama.cpp loads it. None when the GGUF does not say."""
    shared = metadata.get(f"{arch}.attention.shared_kv_layers")
    layers = metadata.get(f"{arch}.block_count")
    if not isinstance(shared, int) or not isinstance(layers, int) or pattern is None:
        return None
    first = layers - shared
    return ",".join(f"{il}<-{first - (2 if pattern[il] == 's' else 1)}" for il in range(first, layers))


def _print_result(result: dict, outputs: list[Path], echo) -> None:
    size = result["gguf"]["bytes"] / 2**20
    echo(f"exported: {outputs[0]} ({result['quant']}, {size:.1f} MiB) in {result['seconds']:.0f} s")
    echo(f"  report: {outputs[1]}")
    if len(outputs) > 2:
        echo(f"  Modelfile: {outputs[2]}  (ollama create NAME -f {outputs[2]})")
    first = result["parity"]["prompts"][0]
    echo(f"  llama.cpp answers {PARITY_PROMPTS[0][0]['content']!r}: {first['llama_cpp_answer'].strip()[:120]!r}")
    if result["gemma_terms"]:
        echo(f"  {result['gemma_terms']}")
