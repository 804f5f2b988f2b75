"""merge-models on image + text checkpoints (Gemma 3 4B/12B/27B: Gemma3ForConditionalGeneration; Gemma 4:
Gemma4ForConditionalGeneration, Gemma4UnifiedForConditionalGeneration): mergekit merges the language model alone,
the towers are carried whole.

mergekit 0.1.5 cannot take these checkpoints as they are: its Gemma 3 image + text definition reads the tower under
transformers 4's tensor names (vision_tower.vision_model.*), which transformers 5 no longer writes, and it has no
Gemma 4 architecture. Its text-only models it merges (Gemma3ForCausalLM from its definition, Gemma 4's decoder by
its architecture inference), so each input is staged as one:

    input folder  --stage_text_view-->  config.json = its text_config as the decoder-only class
                                        *.safetensors = the decoder's tensors under the decoder-only names
    mergekit (the method, then LITI)  -->  the merged decoder
    assemble: the merged decoder under the input's own names + the towers' tensors of the first model, as stored
              + the first model's config.json, processor files

The towers (image/audio encoders and their projectors into the decoder) are frozen in training, so every input
carries the same ones: `check_towers` compares them tensor by tensor before anything is merged and refuses inputs
whose towers differ (a run that trained the projector, `model.train_projector`, or another base), naming them: a
merged decoder beside one input's projector would read image features that projector was not trained with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..families import Family

# (a checkpoint's prefix, the decoder-only class's prefix) for the language model's tensors: Gemma 3's published
# layout (and what transformers 5 writes for it), transformers 5's Gemma 4 layout, and the LM head of each
DECODER_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
# files an image + text checkpoint ships beside its weights that say how images become pixels (copied unchanged)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
TOWERS_SHARD = "model-towers.safetensors"
INDEX = "model.safetensors.index.json"


def has_towers(config, family: Family) -> bool:
    """The checkpoint is an image + text one (a decoder inside a composite config, towers beside it), not a
    text-only one of a family that also has image + text sizes (e.g. Gemma4ForCausalLM)."""
    return bool(family.towers) and getattr(config, "text_config", None) is not None


@dataclass
class Layout:
    """One checkpoint's tensors, split: stored name -> decoder-only name, and the towers' stored names, each with
    the shard file holding it."""

    folder: Path
    decoder: dict[str, str] = field(default_factory=dict)
    towers: list[str] = field(default_factory=list)
    shard: dict[str, str] = field(default_factory=dict)  # stored name -> file name


def read_layout(folder: Path, family: Family, key: str) -> Layout:
    """Split the tensor names of `folder`'s safetensors files (headers only). Raises UserError naming `key` when it
    has no safetensors weights or a tensor is neither the decoder's nor a tower's."""
    from safetensors import safe_open

    layout = Layout(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{key}: {folder} has no *.safetensors weights (merge-models reads safetensors checkpoints)")
    towers = tuple(t.removeprefix("model.") + "." for t in family.towers)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                layout.shard[name] = shard.name
                if name.removeprefix("model.").startswith(towers):
                    layout.towers.append(name)
                    continue
                renamed = next((new + name[len(old):] for old, new in DECODER_PREFIXES if name.startswith(old)), None)
                if renamed is None:
                    raise UserError(f"{key}: {shard.name} holds {name}, which is neither the language model's nor one "
                                    f"of the towers' ({', '.join(family.towers)}); merge-models cannot place it")
                layout.decoder[name] = renamed
    return layout


def tower_digests(layout: Layout) -> dict[str, str]:
    """sha256 of each tower tensor's dtype, shape and bytes."""
    import torch
    from safetensors import safe_open

    digests: dict[str, str] = {}
    by_shard: dict[str, list[str]] = {}
    for name in layout.towers:
        by_shard.setdefault(layout.shard[name], []).append(name)
    for shard, names in by_shard.items():
        with safe_open(str(layout.folder / shard), "pt") as f:
            for name in names:
                tensor = f.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
                h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
                digests[name] = h.hexdigest()
    return digests


def check_towers(layouts: list[tuple[str, Layout]]) -> int:
    """The towers of every input equal the first's, tensor by tensor (dtype, shape, bytes). Returns the number of
    tower tensors. Raises UserError naming each input whose towers differ and how."""
    (first_key, first), *others = layouts
    reference = tower_digests(first)
    problems = []
    for key, layout in others:
        digests = tower_digests(layout)
        if digests.keys() != reference.keys():
            missing = sorted(reference.keys() - digests.keys()) + sorted(digests.keys() - reference.keys())
            problems.append(f"{key}: its towers hold other tensors than {first_key}'s (e.g. {missing[0]})")
            continue
        changed = sorted(k for k in reference if digests[k] != reference[k])
        if changed:
            problems.append(f"{key}: {len(changed)} of its {len(reference)} tower tensors differ from {first_key}'s "
                            f"(e.g. {changed[0]})")
    if problems:
        raise UserError("merge-models merges the language model of image + text checkpoints and carries their image "
                        "(and audio) towers unchanged, so every input must have the same towers; these differ (a "
                        "run that trained the projector, model.train_projector, or another base): a merged decoder "
                        "beside one input's projector would read image features it was not trained with. Merge runs "
                        "trained from one base with the towers frozen (the default):\n"
                        + "\n".join(f"  - {p}" for p in problems))
    return len(reference)


def local_folder(location: str) -> Path:
    """A local folder holding `location`'s config and safetensors files (a hub id: its cached download)."""
    path = Path(location)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(location, allow_patterns=["*.json", "*.safetensors"]))


def stage_text_view(layout: Layout, target: Path) -> None:
    """`target`: the checkpoint's decoder as the decoder-only class (what mergekit reads): config.json = its
    text_config with that class's architecture (transformers' causal-LM class for the text model_type) and the
    checkpoint's dtype, and one safetensors file per input shard holding the decoder's tensors renamed (the
    towers left out), with an index. Reads one shard at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    target.mkdir(parents=True)
    config = json.loads((layout.folder / "config.json").read_text())
    text = dict(config["text_config"])
    text["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text["model_type"]]]
    text.setdefault("dtype", config.get("dtype") or config.get("torch_dtype"))
    (target / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    by_shard: dict[str, list[str]] = {}
    for name in layout.decoder:
        by_shard.setdefault(layout.shard[name], []).append(name)
    weight_map = {}
    for shard, names in sorted(by_shard.items()):
        with safe_open(str(layout.folder / shard), "pt") as f:
            tensors = {layout.decoder[n]: f.get_tensor(n) for n in names}
        save_file(tensors, str(target / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
    (target / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


def assemble(merged: Path, first: Layout, target: Path, dtype: str) -> dict:
    """Write into `target` the image + text checkpoint: mergekit's merged decoder (`merged`, decoder-only names)
    under `first`'s stored names, `first`'s tower tensors as stored (a shard of their own), an index, `first`'s
    config.json (its dtype set to `dtype`) and processor files. Returns the report for merge.json. Raises
    UserError when the merged decoder's tensors are not the input's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    stored = {v: k for k, v in first.decoder.items()}
    shards = sorted(merged.glob("*.safetensors"))
    names = set()
    weight_map = {}
    for i, shard in enumerate(shards):
        with safe_open(str(shard), "pt") as f:
            tensors = {stored.get(n, n): f.get_tensor(n) for n in f.keys()}
        unknown = sorted(n for n in tensors if n not in first.decoder)
        if unknown:
            raise UserError(f"merge-models: mergekit wrote {unknown[0]}, which is not a tensor of the inputs' "
                            "language model (nothing was written)")
        name = f"model-decoder-{i + 1:05d}.safetensors"
        save_file(tensors, str(target / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        names |= tensors.keys()
    missing = sorted(set(first.decoder) - names)
    if missing:
        raise UserError(f"merge-models: mergekit's merge lacks {len(missing)} of the language model's tensors (e.g. "
                        f"{missing[0]}); nothing was written")
    towers = {}
    for name in first.towers:  # as stored: dtype and bytes unchanged
        with safe_open(str(first.folder / first.shard[name]), "pt") as f:
            towers[name] = f.get_tensor(name)
    save_file(towers, str(target / TOWERS_SHARD), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(towers, TOWERS_SHARD)
    (target / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                           indent=2) + "\n")
    config = json.loads((first.folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = config["text_config"]["dtype"] = dtype
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copied = []
    for name in PROCESSOR_FILES:
        if (first.folder / name).is_file():
            (target / name).write_bytes((first.folder / name).read_bytes())
            copied.append(name)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in towers.values()})
    return {"decoder_tensors": len(names), "tower_tensors": len(towers), "tower_dtype": ", ".join(dtypes),
            "processor_files": copied}


def stage_inputs(items: list, work: Path, family: Family, echo: Callable[[str], None]) -> tuple[Layout, int]:
    """Each input (MergeInput: `.key`, `.given`, `.location`) read, its towers compared with the first's
    (check_towers) and staged as its decoder-only view under `work` (its `.text_view` set). Returns the first
    input's layout and the number of tower tensors. Raises UserError (check_towers, read_layout)."""
    layouts = []
    for item in items:
        folder = local_folder(item.location)
        layouts.append((f"{item.key} {item.given}", read_layout(folder, family, f"{item.key} {item.given}")))
    count = check_towers(layouts)
    echo(f"image + text checkpoints: merging the language model ({len(layouts[0][1].decoder)} tensors) with "
         f"mergekit; the towers ({count} tensors, equal in every input) are carried from {items[0].given}")
    for i, (item, (_, layout)) in enumerate(zip(items, layouts)):
        view = work / f"text-view-{i}"
        stage_text_view(layout, view)
        item.text_view = str(view)
    return layouts[0][1], count
