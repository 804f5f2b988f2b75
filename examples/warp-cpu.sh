#!/usr/bin/env bash
# The seed's whole post-training recipe on a CPU, offline, in a few minutes, on a tiny random Gemma 2:
#   SFT -> on-policy distillation from a teacher -> reward model -> RL x2 with EMA -> SLERP -> LITI,
# every stage scored on held-out prompts by the reward model and a reward function (eval's reward table).
# The data ships with the package: `greetings` (16 questions, each answered "Hello, friend." once and
# three times with "Sure ..."),
# `greetings-pairs` (the greeting preferred), `greetings-held-out` (8 unseen prompts). The reward pays answers
# whose first word is "Hello" (recipes/rewards/starts_with.py). A toy: it shows each stage doing its job on a
# model small enough to train in seconds, not a useful chat model.
# Run from the repository root, after `make install`: bash examples/warp-cpu.sh [OUT]   (OUT: runs/warp-cpu)
set -euo pipefail
OUT=${1:-runs/warp-cpu}
# the command: $GEMMA2_TUNE, else the repository's .venv (make install), else gemma2-tune on the PATH
G="${GEMMA2_TUNE:-$( [ -x .venv/bin/gemma2-tune ] && echo .venv/bin/gemma2-tune || echo gemma2-tune )}"
CPU=(--set quantization.load_in_4bit=false --set model.dtype=float32 --set training.gradient_accumulation_steps=1
     --set training.save_steps=null)
WORD=recipes/rewards/starts_with.py:starts_with_word
mkdir -p "$OUT"

echo "== 1. SFT: a teacher (150 steps) and the student (60 steps), full fine-tunes of the tiny model on the"
echo "      greetings chats (a real run distils from a larger teacher: Gemma 2 27B into 9B)"
$G sft --model builtin:tiny-gemma2 --dataset greetings -o "$OUT/teacher" --overwrite --max-steps 150 \
    --learning-rate 1e-3 --set lora.enabled=false "${CPU[@]}" --set data.packing=false \
    --set training.per_device_train_batch_size=8 --set training.logging_steps=50
$G sft --model builtin:tiny-gemma2 --dataset greetings -o "$OUT/sft" --overwrite --max-steps 60 \
    --learning-rate 1e-3 --set lora.enabled=false "${CPU[@]}" --set data.packing=false \
    --set training.per_device_train_batch_size=8 --set training.logging_steps=20 --set training.seed=7

echo "== 2. On-policy distillation: the student writes answers to the prompts and learns the teacher's"
echo "      distribution on them"
$G distill --model "$OUT/sft" --teacher "$OUT/teacher" --dataset greetings -o "$OUT/distill" --overwrite \
    --max-steps 60 --learning-rate 1e-3 --set lora.enabled=false --set teacher.load_in=full "${CPU[@]}" \
    --set distill.max_completion_length=16 --set data.max_length=64 --set training.per_device_train_batch_size=8 \
    --set training.logging_steps=20

echo "== 3. Reward model: prefers 'Hello, friend.' (pairs on the teacher's questions)"
$G reward --model "$OUT/distill" --dataset greetings-pairs -o "$OUT/reward" --overwrite --max-steps 30 \
    --learning-rate 5e-3 "${CPU[@]}" --set training.per_device_train_batch_size=8 --set data.max_length=64 \
    --set training.logging_steps=10

echo "== 4. RL twice (seeds 1 and 2): GRPO (dapo loss) against the reward model, LoRA on the distilled"
echo "      student, an EMA of each policy"
for seed in 1 2; do
  $G rl --model "$OUT/distill" --dataset greetings -o "$OUT/rl$seed" --overwrite --reward-model "$OUT/reward" \
      --max-steps 30 --learning-rate 2e-3 "${CPU[@]}" --set lora.dropout=0 --set rl.num_generations=4 \
      --set rl.max_completion_length=16 --set data.max_length=64 --set rl.mask_truncated_completions=true \
      --set training.per_device_train_batch_size=8 --set training.ema_decay=0.9 --set training.seed=$seed \
      --set training.logging_steps=10
done

echo "== 5. WARP: SLERP of the two EMAs, then LITI halfway back to the distilled student"
rm -rf "$OUT/slerp" "$OUT/warp"   # this script's own merges, from an earlier run of it
$G merge-models --method slerp --models "$OUT/rl1/ema" "$OUT/rl2/ema" -o "$OUT/slerp" --dtype float32
$G merge-models --method linear --models "$OUT/slerp" --base "$OUT/distill" --liti 0.5 -o "$OUT/warp" --dtype float32

echo "== 6. Every stage on the held-out prompts: greedy answers, then 4 sampled answers each"
STAGES=(--compare "$OUT/teacher" --compare "$OUT/sft" --compare "$OUT/rl1/ema" --compare "$OUT/rl2/ema" --compare "$OUT/slerp"
        --compare "$OUT/warp")
$G eval --model "$OUT/distill" --dataset greetings-held-out --reward-function $WORD --reward-model "$OUT/reward" \
    --max-new-tokens 16 "${STAGES[@]}" --json "$OUT/scores-greedy.json"
$G eval --model "$OUT/distill" --dataset greetings-held-out --reward-function $WORD --reward-model "$OUT/reward" \
    --max-new-tokens 16 --temperature 1 --samples 4 "${STAGES[@]}" --json "$OUT/scores-sampled.json"
