"""Data: from a user's rows to packed, masked token blocks.

    sources.py   where rows come from (aliases, hub, local files) and their schemas -> role/content messages
    parts.py     what a conversation is made of: turns of parts (text, reasoning, tool calls), rendered text, BadRow
    turns.py     turns made of parts; Gemma 2/3's turn format: normalise (system policy), render, supervision spans
    gemma4.py    Gemma 4's turn format: native system turn, thought channel, native tool syntax, empty thought block
    template.py  the same format as the Jinja chat template saved with every run
    template_gemma4.py  Gemma 4's template, generated from the same rules
    images.py    images in rows and requests: where they point, read and checked, expanded by the checkpoint's processor
    examples.py  rendered rows -> token ids + labels, with a report of every row left out
    prompts.py   rows -> prompts for on-policy distillation
    preferences.py  rows -> preference pairs (DPO, reward) or unpaired examples (KTO), ids as TRL takes them
    packing.py   best-fit packing into blocks (per-row position ids, no cross-row attention) and the collator
    collator.py  batches for image + text checkpoints: token types always, the batch's images as pixels
    cache.py     the tokenized-data cache
    preview.py   `gemma2-tune preview`: rows as they will be trained
"""
