"""Models: the one loading path and what it checks, quantization, LoRA, and the builtin models.

    loading.py       load_model(LoadRequest) for training, chat, merge, eval; tokenizer; family of a checkpoint
    tokenizer_files.py  the tokenizer's SentencePiece model (tokenizer.model), saved with every folder we write
    checks.py        before loading (kernel vs family) and after (kernel in use, soft-caps, dtype); ModelReport
    quantization.py  the one bitsandbytes config builder
    lora.py          the PEFT config, where adapters landed, parameter counts
    serving.py       what a saved folder needs to generate as trained (stop tokens, KV cache); generated text
    builtin.py       builtin:* names -> local folders built on first use
    tiny.py          tiny random models of each family
    gguf.py          builtin:gemma-3-270m from GGUF packages
"""
