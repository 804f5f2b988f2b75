"""After training: using a run (chat), scoring it (eval, lm-eval tasks), merging it for serving.

    inference.py  find a run's base, load base + adapter through the one loading path, generate
    chat.py       one-shot answers and the interactive session
    merge.py      LoRA folded into bf16 weights, self-checked before it reaches the target folder
    evaluate.py   held-out loss on model-turn tokens, base vs fine-tuned
    harness.py    lm-evaluation-harness tasks
"""
