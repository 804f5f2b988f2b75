"""After training: using a run, scoring it, merging it, serving and exporting it.

    inference.py        find a run's base, load base + adapter through the one loading path, generate
    materialize.py      what a user points at -> a model folder (a LoRA run merged into a temporary folder)
    selfcheck.py        does a written folder compute what it should (merge, merge-models, serve, export)
    chat.py             one-shot answers and the interactive session
    merge.py            LoRA folded into bf16 weights, self-checked before it reaches the target folder
    merge_models.py     `merge-models`: mergekit (linear, SLERP, TIES, DARE, task arithmetic), LITI; WARP
    merge_towers.py     `merge-models` of image + text checkpoints: the decoder staged for mergekit, towers carried
    eval.py             `eval`: the mode a request asks for, each mode one function (loss, rewards, pairs, tasks)
    evaluate.py         `eval`'s held-out loss on model-turn tokens, base vs fine-tuned and --compare models
    harness.py          `eval --tasks`: lm-evaluation-harness tasks
    reward_eval.py      `eval --reward-function / --reward-model`: mean reward of each model's answers
    preference_eval.py  `eval` of a reward model: pairwise accuracy on held-out pairs
    serve/              `serve`: the OpenAI-compatible server (schema, engines, routes, run)
    export.py           `export`: one GGUF for llama.cpp, parity-checked against transformers
    gguf_parity.py      export's parity: the GGUF in llama.cpp vs transformers, bounded by measured floors
    ggml_quant.py       llama.cpp's quantized arithmetic in transformers (weights and product inputs rounded)
    projector.py        `export` of an image + text model: llama.cpp's projector file (mmproj) beside the GGUF
    image_prompt.py     export's image prompt: generated through llama.cpp (GGUF + mmproj) vs transformers
    ollama.py           the Ollama Modelfile: the training renderer as a Go text/template
"""
