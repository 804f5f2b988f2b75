"""The data a run trains on: rows -> held-out split -> tokenized, masked, packed blocks (cached).

Its own module under training/ because it joins data (rows, format, packing) and models (the tokenizer and
the checkpoint's family, which decides how system text is folded)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..config.schema import RunConfig
from ..data import cache
from ..data.examples import build_examples
from ..data.collator import IMAGES_COLUMN, images_column
from ..data.images import images_fingerprint
from ..data.packing import IMAGE_ROWS_UNPACKED, pack, unpacked
from ..data.sources import load_rows
from ..families import Family
from ..models.loading import load_image_processing
from .setup import run_tokenizer

Echo = Callable[[str], None]


@dataclasses.dataclass
class TrainingData:
    """Everything a run trains and evaluates on, and what it knows about where it came from."""

    tokenizer: Any  # carrying the run's generated chat template
    family: Family
    blocks: list
    report: Any
    source: Any
    cache_key: str
    cache_hit: bool
    eval_blocks: list | None = None
    eval_report: Any = None
    base_chat_template: str | None = None  # the checkpoint's own template, replaced by the run's
    empty_thought: bool = False  # Gemma 4 12B/26B-A4B/31B: rows carry the empty thought block (data/gemma4.py)
    images: Any = None  # the checkpoint's image processor (data/images.py ImageProcessing); None: none



def split_rows(rows: list, cfg: RunConfig) -> tuple[list, list]:
    """Held-out rows: a seeded fraction of the training source (or none)."""
    import random

    if not cfg.data.eval_fraction:
        return rows, []
    order = list(range(len(rows)))
    random.Random(cfg.training.seed).shuffle(order)
    n_eval = max(1, round(len(rows) * cfg.data.eval_fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _blocks(rows: list, tokenizer, family: Family, cfg: RunConfig, key: str, main: bool, empty_thought: bool,
            images=None):
    """Tokenized, masked, packed rows from the cache, or built and cached; -> (blocks, report, hit)."""
    cached = cache.load(key)
    if cached is not None:
        return cached[0], cached[1], True
    examples, report = build_examples(rows, tokenizer, cfg.data, family, empty_thought=empty_thought, images=images)
    blocks = pack(examples, cfg.data.max_length) if cfg.data.packing else unpacked(examples)
    if main:
        cache.save(key, blocks, report)
    return blocks, report, False


def prepare_data(cfg: RunConfig, family: Family, echo: Echo, state=None) -> TrainingData:
    """Tokenizer, rows, blocks: everything that can fail on the user's data, before anything is written.
    `family`: the checkpoint's (models.loading.checkpoint_family), which decides how system text folds.

    Blocks come from the tokenized-data cache when the same data, tokenizer and data settings were seen
    before; the main process builds them first and the other ranks read its result.
    """
    import contextlib

    run = run_tokenizer(cfg, family)
    tokenizer, empty_thought, base_template = run.tokenizer, run.empty_thought, run.base_chat_template
    images = load_image_processing(cfg.base_model, family, tokenizer, pan_and_scan=getattr(cfg.data, "pan_and_scan",
                                                                                          False),
                                   revision=cfg.model.revision)
    rows, source = load_rows(cfg.data)
    for line in source.lines():  # a folder's files: what is read, and the hidden copies that are not
        echo(line)
    rows, held_out = split_rows(rows, cfg)
    seed = cfg.training.seed if cfg.data.eval_fraction else None
    key = cache.cache_key(cfg.data, source.fingerprint, tokenizer, seed, family.key, empty_thought,
                          _images_key(rows + held_out, cfg, images, family))
    eval_key = key
    if cfg.data.eval_split:
        held_out, held_source = load_rows(cfg.data.model_copy(update={"split": cfg.data.eval_split}))
        eval_key = cache.cache_key(cfg.data, held_source.fingerprint, tokenizer, family=family.key,
                                   empty_thought=empty_thought, images=_images_key(held_out, cfg, images, family))
    main = state is None or state.is_main_process
    with state.main_process_first() if state is not None else contextlib.nullcontext():
        blocks, report, hit = _blocks(rows, tokenizer, family, cfg, key + "-train", main, empty_thought, images)
        eval_blocks, eval_report = None, None
        if held_out:
            eval_blocks, eval_report, _ = _blocks(held_out, tokenizer, family, cfg, eval_key + "-eval", main,
                                                  empty_thought, images)
    for line in report.summary_lines():
        echo(line)
    if report.images:
        echo(f"images: {images.describe()}")
        if getattr(cfg.data, "packing", False):
            echo(f"packing: {report.image_rows} {IMAGE_ROWS_UNPACKED}")
    if eval_report is not None:
        echo(f"held out for evaluation: {eval_report.rows_kept} rows, {eval_report.supervised_tokens} supervised tokens")
    echo(f"tokenized data: {'from cache' if hit else 'tokenized and cached'} ({key}); {len(blocks)} "
         + (f"blocks of <= {cfg.data.max_length} tokens" if cfg.data.packing else "rows, unpacked"))
    gemma4 = (f", thinking {'on' if cfg.data.enable_thinking else 'off'}"
              + (", answers after an empty thought block (as this size's -it template)" if empty_thought else "")
              if family.turn_format == "gemma4" else "")
    echo(f"chat template: generated for {family.display}, system policy '{cfg.data.system_policy}'{gemma4}"
         + ("; it replaces the checkpoint's own template (kept as chat_template.base.jinja)" if base_template else ""))
    return TrainingData(tokenizer, family, blocks, report, source, key, hit, eval_blocks, eval_report, base_template,
                        empty_thought, images)


def _images_key(rows: list, cfg: RunConfig, images, family: Family) -> str | None:
    """The cache key's part for images: the rows' image bytes and the image processor's settings (None: no row
    points at an image, or the family reads none)."""
    if family.images is None:
        return None
    found = images_fingerprint(rows, getattr(cfg.data, "max_image_mb", 20.0))
    if found is None:
        return None
    return found + (images.fingerprint() if images is not None else "no-processor")


def blocks_dataset(blocks):
    """A datasets.Dataset of input_ids / labels / position_ids, one item per block (and its images, JSON per block,
    when blocks have images: data/collator.py)."""
    from datasets import Dataset

    columns = {"input_ids": [b.input_ids for b in blocks], "labels": [b.labels for b in blocks],
               "position_ids": [b.position_ids for b in blocks]}
    found = images_column(blocks)
    if found is not None:
        columns[IMAGES_COLUMN] = found
    return Dataset.from_dict(columns)


def data_collator(data: TrainingData, dtype: str):
    """The collator a run's batches go through: for an image + text checkpoint the image one (token types always,
    the batch's pixels), else BlockCollator."""
    from ..data.collator import ImageBlockCollator
    from ..data.packing import BlockCollator

    pad = data.tokenizer.pad_token_id
    if data.family.images is None:
        return BlockCollator(pad)
    if data.images is not None:
        return ImageBlockCollator(pad, images=data.images, dtype=dtype)
    soft = data.tokenizer.convert_tokens_to_ids(data.family.images.soft_token)
    return ImageBlockCollator(pad, soft_token_id=soft if isinstance(soft, int) else -1,
                              token_type_key=data.family.images.token_type_key, dtype=dtype)
