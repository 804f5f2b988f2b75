"""Training: the registry of methods, the run lifecycle and what trains inside it.

    methods.py      the registry: one entry per method (schema, runner, plan terms, command flags); the top
    lifecycle.py    the one run order: output folder, manifest (attempts, status), resume, save, failures
    setup.py        every runner's first step: the base's family (kernel checked), its tokenizer with the run's template
    sft.py          `gemma2-tune sft`'s runner: conversations, the supervised loss
    distill.py      `gemma2-tune distill`'s runner: on-policy distillation (TRL's DistillationTrainer)
    dpo.py          `gemma2-tune dpo`'s runner: DPO and TRL's paired losses; KTO on unpaired examples
    reward.py       `gemma2-tune reward`'s runner: a one-score reward model on preference pairs
    rl.py           `gemma2-tune rl`'s runner: GRPO loss types and RLOO, rewarded by functions / a reward model
    generation.py   what the on-policy methods share around TRL's generation (counts, prompt order, sums, the
                    inverse-CDF draw of each sampled token on a CPU)
    trainer.py      TRL trainer arguments, the supervised-only loss trainer, LoRA applied by TRL
    batching.py     the micro-batch shape: accumulation folded when memory allows
    data.py         the data a run trains on (tokenizer, rows, cached packed blocks)
    logprobs.py     the one LM head of every method: next-token log-probabilities at labelled positions only, fp32
                    tiles, soft-capped; replaces TRL's fused head in dpo/KTO/GRPO/RLOO
    divergence.py   distill's divergence (forward/reverse KL, JSD) at generated positions only, whole vocabulary
                    rows in fp32 blocks, each lm_head once per step; replaces TRL's chunked one where it can
    loss.py         tiled cross-entropy at supervised positions, with the final soft-cap (the log-probabilities' sum)
    compiling.py    training.torch_compile: regional compilation, checked against eager on a probe batch
    kernels.py      training.use_liger_kernel: Liger's kernels, checked against the plain model on a probe batch
    ema.py          training.ema_decay: the moving average of the trainable weights
    callbacks.py    loss lines, checkpoint markers, SIGTERM and Ctrl-C, peak memory
    progress.py     live progress bar on a terminal
    checkpoints.py  complete checkpoints and choosing one to resume from
    launch.py       accelerate launches and their shared rules
    manifest.py     run.json and the output folder's safety rules
    card.py         loss plot and model card
    plan.py         `gemma2-tune plan`: memory per GPU before launching
    imageplan.py    plan's lines about images: the processor's resolution, image tokens per row, the tower's peak
    describe.py     a resolved config in a few lines (light: no torch)
"""
