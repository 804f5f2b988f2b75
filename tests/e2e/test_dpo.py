"""Preference training on CPU with the tiny Gemma 2: DPO's loss and implicit reward against a direct computation,
a behaviour moved by DPO from an sft run (the reference is the sft policy), a reward model and its merged folder
through plain transformers, and bad pairs refused before anything is written."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, resumed_equals_uninterrupted, write_jsonl
from gemma2_tune.cli import app

runner = CliRunner()
PREFS = ROOT / "gemma2_tune" / "assets" / "preferences"
FP32 = ["--set", "quantization.load_in_4bit=false", "--set", "model.dtype=float32", "--set", "lora.dropout=0",
        "--set", "training.save_steps=null", "--set", "training.gradient_accumulation_steps=1"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_loss_at_step_zero_is_ln2_and_the_margin_is_beta_times_the_log_ratio_difference(tiny_model_dir, tmp_path):
    """fp32: with LoRA B = 0 the policy is the reference, so TRL's loss is ln 2 (1e-6). With the adapter moved,
    the logged reward margin == beta x ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)), each a
    sum of the model's own (soft-capped) log-softmax over the answer tokens, from two plain forward passes."""
    from datasets import Dataset

    from gemma2_tune.config.dpo import DpoConfig
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.data.preferences import load_preferences, trl_rows
    from gemma2_tune.data.template import use_run_template
    from gemma2_tune.families import GEMMA2
    from gemma2_tune.models.loading import LoadRequest, load_model, load_tokenizer
    from gemma2_tune.models.lora import lora_config
    from gemma2_tune.training.dpo import GemmaDPOTrainer, dpo_args
    from gemma2_tune.training.launch import Launch

    out = tmp_path / "x"
    cfg = resolve(None, ["model.name_or_path=builtin:tiny-gemma2", "quantization.load_in_4bit=false",
                         "model.dtype=float32", "dpo.beta=0.25", f"output.dir={out}", "data.dataset=concise"],
                  schema=DpoConfig).config
    tokenizer = load_tokenizer(str(tiny_model_dir))
    use_run_template(tokenizer, GEMMA2, "fold")
    pairs = load_preferences(cfg.data, tokenizer, GEMMA2, "paired").items[:2]
    model, report = load_model(LoadRequest.for_run(cfg))
    assert report.final_softcap == 30.0 and report.attn_implementation == "eager"
    trainer = GemmaDPOTrainer(model=model, args=dpo_args(cfg, out, Launch("single"), False), processing_class=tokenizer,
                              train_dataset=Dataset.from_list(trl_rows(pairs, "dpo")), peft_config=lora_config(cfg))
    batch = trainer.data_collator(trl_rows(pairs, "dpo"))
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch, False)
    assert abs(loss.item() - math.log(2)) <= 1e-6

    g = torch.Generator().manual_seed(0)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trainer._compute_loss(trainer.model, batch, False)
        policy = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with trainer.model.disable_adapter():
            reference = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert policy.abs().max() <= 30.0  # the model's own logits are soft-capped

    def answer_logps(logits):
        logps = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return (logps * batch["completion_mask"][:, 1:]).sum(-1)

    ratios = answer_logps(policy) - answer_logps(reference)
    chosen, rejected = ratios.chunk(2)
    margins = cfg.dpo.beta * (chosen - rejected)
    assert margins.abs().min() > 1e-2  # the adapter moved both sides: a margin that can be wrong
    assert abs(trainer._metrics["train"]["rewards/margins"][-1] - margins.mean().item()) <= 1e-5


@pytest.fixture(scope="module")
def sft_two_styles(tmp_path_factory):
    """A tiny Gemma 2 LoRA-tuned on both answers of every training pair: it answers in either style."""
    tmp = tmp_path_factory.mktemp("sft")
    rows = []
    for pair in jsonl(PREFS / "train.jsonl"):
        rows += [{"messages": pair["prompt"] + pair[side]} for side in ("chosen", "rejected")]
    data, out = write_jsonl(tmp / "both.jsonl", rows), tmp / "sft"
    r = runner.invoke(app, ["sft", "--model", "builtin:tiny-gemma2", "--dataset", str(data), "-o", str(out),
                            "--max-steps", "40", "--learning-rate", "5e-3", *FP32, "--set", "data.packing=false",
                            "--set", "training.per_device_train_batch_size=8", "--set", "training.logging_steps=10"])
    assert r.exit_code == 0, r.output
    return out


def greedy_lengths(target: dict, prompts: list) -> list[int]:
    """Tokens of each greedy answer (at most 40) of a run folder."""
    from gemma2_tune.after.inference import Sampling, load, read_run, reply

    run = read_run(target.get("adapter"), target.get("model"))
    loaded = load(run, "fp32")
    return [len(loaded.tokenizer(reply(loaded, p, run.system_policy, Sampling(max_new_tokens=40)),
                                 add_special_tokens=False).input_ids) for p in prompts]


@pytest.mark.slow
def test_dpo_from_an_sft_run_prefers_the_concise_style(sft_two_styles, tmp_path):
    out = tmp_path / "dpo"
    r = runner.invoke(app, ["dpo", "--model", str(sft_two_styles), "--dataset", "concise", "-o", str(out),
                            "--max-steps", "12", "--learning-rate", "5e-3", *FP32,
                            "--set", "data.eval_dataset=concise-held-out", "--set", "training.eval_steps=6",
                            "--set", "training.per_device_train_batch_size=4", "--set", "training.logging_steps=1"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    assert m["command"] == "dpo" and m["status"] == "completed" and m["global_step"] == 12
    d = m["dpo"]
    assert f"the starting policy: a frozen copy of the adapter of {sft_two_styles}" in d["reference"]
    # the reference is the sft policy: at step 1 the policy (the same adapter) equals it, so the loss is ln 2
    assert abs(d["history"][0]["loss"] - math.log(2)) <= 1e-5 and d["history"][0]["rewards/margins"] == 0.0
    assert d["eval"]["rewards/accuracies"] >= 0.9 and d["eval"]["rewards/margins"] > 0, d["eval"]
    evals = [e["rewards/accuracies"] for e in m["training"]["eval_history"]]
    assert len(evals) == 2 and m["model"]["final_softcap"] == 30.0
    assert "accuracy" in r.output and "held out (12 pairs): loss" in r.output
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert "tags: [gemma2, gemma2-tune, dpo]" in (out / "README.md").read_text()
    # greedy answers to held-out prompts: shorter (the concise style) after DPO than after sft
    prompts = [pair["prompt"] for pair in jsonl(PREFS / "held_out.jsonl")]
    before = greedy_lengths({"adapter": str(sft_two_styles)}, prompts)
    after = greedy_lengths({"adapter": str(out)}, prompts)  # the run's base is the sft run's base
    print("greedy answer tokens, sft:", before, "dpo:", after)
    assert sum(after) < 0.6 * sum(before), (before, after)


@pytest.mark.slow
def test_reward_model_orders_held_out_pairs_and_its_merge_scores_the_same(tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    r = runner.invoke(app, ["reward", "--model", "builtin:tiny-gemma2", "--dataset", "concise", "-o", str(out),
                            "--max-steps", "10", "--learning-rate", "5e-3", *FP32, "--set", "data.max_length=256",
                            "--set", "data.eval_dataset=concise-held-out", "--set", "training.eval_steps=5",
                            "--set", "training.per_device_train_batch_size=4", "--set", "training.logging_steps=5"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    e = m["reward"]["eval"]
    assert e["pairs"] == 12 and e["pairwise_accuracy"] >= 0.95, e
    assert [h["step"] for h in m["training"]["eval_history"]] == [5, 10]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(merged)])
    assert r.exit_code == 0, r.output

    held = jsonl(PREFS / "held_out.jsonl")[:4]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    plain = AutoModelForSequenceClassification.from_pretrained(merged, attn_implementation="eager", dtype=torch.float32)
    # the base's own config says nothing of the head: one score is asked for, as the model card says
    trained = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1, attn_implementation="eager",
                                                                     dtype=torch.float32)
    from gemma2_tune.data.preferences import load_preferences
    from gemma2_tune.config.schema import PreferenceDataSection
    from gemma2_tune.families import GEMMA2

    pairs = load_preferences(PreferenceDataSection(dataset="concise-held-out"), tokenizer, GEMMA2, "paired").items
    right = 0
    for row, pair in zip(held, pairs):
        scores = []
        for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            rendered = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True,
                                                     return_tensors="pt")
            assert rendered["input_ids"][0].tolist() == pair.prompt_ids + ids  # the saved template renders what trained
            with torch.no_grad():
                a, b = plain(**rendered).logits[0, 0].item(), trained(**rendered).logits[0, 0].item()
            assert abs(a - b) <= 1e-4, (a, b)
            scores.append(a)
        right += scores[0] > scores[1]
    assert right == len(held)

    # eval of a reward model: its pairwise accuracy on pairs, the run (adapter) and its merge in one table, equal to
    # what training's own held-out evaluation counted (TRL's batched evaluation; here one sequence at a time)
    table = tmp_path / "pairs.json"
    r = runner.invoke(app, ["eval", "--adapter", str(out), "--dataset", "concise-held-out", "--compare", str(merged),
                            "--json", str(table)])
    assert r.exit_code == 0 and "pairwise accuracy" in r.output, r.output
    assert "rows up to 256 tokens (the run's data.max_length" in r.output  # as training scored them (no pair is cut)
    written = json.loads(table.read_text())
    assert written["max_length"] == 256 and written["max_rows"] is None  # what the figures were computed at
    results = written["results"]
    assert list(results) == ["fine-tuned", str(merged)], results
    assert results["fine-tuned"]["pairs"] == 12 and results["fine-tuned"]["pairwise_accuracy"] == e["pairwise_accuracy"]
    assert abs(results["fine-tuned"]["margin"] - results[str(merged)]["margin"]) <= 1e-4, results
    assert results["fine-tuned"]["margin"] > 0


def test_weight_averaged_reward_models_merge_their_score_heads(tmp_path):
    """WARM (Rame et al. 2024): two reward runs from one base (a LoRA run and a full fine-tune, different seeds, so
    different score heads) averaged by merge-models: the merged score head is the mean of theirs, the result is a reward model that eval scores
    beside its inputs; a causal LM is not merged into a reward model, and nothing generates from one."""
    pytest.importorskip("mergekit")
    from safetensors.torch import load_file

    runs = []
    for seed, lora in ((1, "true"), (2, "false")):  # a LoRA run and a full fine-tune
        out = tmp_path / f"rm{seed}"
        r = runner.invoke(app, ["reward", "--model", "builtin:tiny-gemma2", "--dataset", "concise", "-o", str(out),
                                "--max-steps", "6", "--learning-rate", "5e-3", "--set", f"training.seed={seed}", *FP32,
                                "--set", "training.per_device_train_batch_size=4", "--set", f"lora.enabled={lora}"])
        assert r.exit_code == 0, r.output
        runs.append(out)
    r = runner.invoke(app, ["merge", "--adapter", str(runs[0]), "--output", str(tmp_path / "rm1-merged")])
    assert r.exit_code == 0, r.output
    merged = [load_file(str(tmp_path / "rm1-merged" / "model.safetensors")), load_file(str(runs[1] / "model.safetensors"))]
    assert not (runs[1] / "generation_config.json").exists()  # a reward model's folder: nothing to generate with
    warm = tmp_path / "warm"
    r = runner.invoke(app, ["merge-models", "--method", "linear", "--models", str(runs[0]), str(runs[1]),
                            "-o", str(warm)])
    assert r.exit_code == 0 and "scores finite on 3 chats: yes" in r.output, r.output
    got = load_file(str(warm / "model.safetensors"))
    a, b = merged
    assert (a["score.weight"] - b["score.weight"]).abs().max() > 1e-2  # the seeds made different heads
    for name in ("score.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.allclose(got[name], (a[name] + b[name]) / 2, atol=1e-6), name
    report = json.loads((warm / "merge.json").read_text())
    assert [m["head"] for m in report["models"]] == ["sequence-classification"] * 2
    assert json.loads((warm / "config.json").read_text())["architectures"] == ["Gemma2ForSequenceClassification"]
    assert not (warm / "generation_config.json").exists()

    table = tmp_path / "pairs.json"
    r = runner.invoke(app, ["eval", "--model", str(warm), "--dataset", "concise-held-out", "--compare", str(runs[0]),
                            "--compare", str(runs[1]), "--json", str(table)])
    assert r.exit_code == 0, r.output
    results = json.loads(table.read_text())["results"]
    assert list(results) == [str(warm), str(runs[0]), str(runs[1])] and all(x["pairs"] == 12 for x in results.values())

    r = runner.invoke(app, ["merge-models", "--method", "linear", "--models", str(runs[0]), "builtin:tiny-gemma2",
                            "-o", str(tmp_path / "mixed")])
    assert r.exit_code == 2 and "builtin:tiny-gemma2 is a causal LM" in r.output and "is a reward model" in r.output
    assert not (tmp_path / "mixed").exists()
    r = runner.invoke(app, ["merge-models", "--method", "task_arithmetic", "--models", *map(str, runs), "--base",
                            "builtin:tiny-gemma2", "-o", str(tmp_path / "mixed")])  # the causal base they came from
    assert r.exit_code == 2 and "reward models merge by weight averaging (--method linear or slerp" in r.output
    assert not (tmp_path / "mixed").exists()
    for args in (["chat", "--model", str(warm), "--prompt", "hi"], ["sft", "--model", str(warm), "-o",
                                                                     str(tmp_path / "sft")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "is a reward model, a sequence classifier" in r.output, r.output
    assert not (tmp_path / "sft").exists()


def test_bad_pairs_exit_2_naming_the_row_and_write_nothing(tmp_path):
    good = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hi."}],
            "rejected": [{"role": "assistant", "content": "Well, hello there."}]}
    cases = {
        "no rejected side": {"prompt": "Hi?", "chosen": "Hi."},
        "identical": {**good, "rejected": good["chosen"]},
        "prompt ends on a model turn": {**good, "prompt": good["prompt"] + [{"role": "assistant", "content": "x"}]},
    }
    for i, (what, bad) in enumerate(cases.items()):
        data = write_jsonl(tmp_path / f"bad{i}.jsonl", [good, bad])
        out = tmp_path / f"out{i}"
        r = runner.invoke(app, ["dpo", "--model", "builtin:tiny-gemma2", "--dataset", str(data), "-o", str(out),
                                "--set", "data.on_bad_rows=error"])
        assert r.exit_code == 2, (what, r.output)
        assert f"bad{i}.jsonl line 2" in r.output and "Traceback" not in r.output, (what, r.output)
        assert not out.exists(), what
    r = runner.invoke(app, ["dpo", "--model", "builtin:tiny-gemma2", "--set", "dpo.loss_type=[simpo]", "--dry-run"])
    assert r.exit_code == 2 and "trl.experimental" in r.output
    r = runner.invoke(app, ["dpo", "--model", "builtin:tiny-gemma2", "--set", "dpo.loss_type=[kto,sigmoid]",
                            "--dry-run"])
    assert r.exit_code == 2 and "cannot be combined" in r.output


@pytest.mark.slow
def test_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path):
    common = ["--model", "builtin:tiny-gemma2", "--dataset", "concise", "--max-steps", "8", "--learning-rate", "5e-3",
              *FP32, "--set", "training.save_steps=3", "--set", "training.logging_steps=1",
              "--set", "training.per_device_train_batch_size=2", "--set", "data.max_length=64"]
    resumed_equals_uninterrupted(["dpo", *common], tmp_path, "step 4/", 8)


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_run_resumes(tmp_path):
    """Ctrl-C (SIGINT) does what SIGTERM does: the step finishes, a checkpoint is saved, run.json says
    interrupted, exit 143, and --resume completes the run (was: exit 130, run.json 'failed', 'KeyboardInterrupt: ')."""
    import signal

    from conftest import sigterm_after

    out = tmp_path / "run"
    args = ["dpo", "--model", "builtin:tiny-gemma2", "--dataset", "concise", "--max-steps", "6", *FP32,
            "--set", "training.logging_steps=1", "--set", "training.per_device_train_batch_size=2",
            "--set", "data.max_length=64", "-o", str(out)]
    log = sigterm_after(args, "step 3/", tmp_path / "log.txt", sig=signal.SIGINT)
    assert "Ctrl-C: stopping after this step with a checkpoint" in log and "Traceback" not in log
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "interrupted" and m["stopped_by"] == "Ctrl-C (SIGINT)", m.get("error")
    assert f"stopped by Ctrl-C (SIGINT) at step {m['global_step']}; checkpoint saved in" in log
    assert (Path(m["checkpoint"]) / "complete.json").is_file()
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["global_step"] == 6
    assert [a["status"] for a in m["attempts"]] == ["interrupted", "completed"]


@pytest.mark.slow
def test_kto_on_unpaired_examples_and_the_preview_of_pairs(tmp_path):
    r = runner.invoke(app, ["preview", "--set", "method=dpo", "--model", "builtin:tiny-gemma2", "--dataset", "concise",
                            "-n", "1"])
    assert r.exit_code == 0, r.output
    assert "chosen, 5 tokens: ⟦Paris.<end_of_turn>\n⟧" in r.output and "40 read, 40 kept" in r.output
    out = tmp_path / "kto"
    r = runner.invoke(app, ["dpo", "--model", "builtin:tiny-gemma2", "--dataset", "concise-kto", "--loss-type", "kto",
                            "-o", str(out), "--max-steps", "6", "--learning-rate", "5e-3", *FP32,
                            "--set", "training.per_device_train_batch_size=4", "--set", "training.logging_steps=2",
                            "--set", "data.eval_dataset=concise-kto-held-out", "--set", "training.eval_steps=6"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    assert m["dpo"]["trainer"] == "KTOTrainer" and m["data"]["items"] == 80 and m["data"]["eval_items"] == 24
    history = m["dpo"]["history"]
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] and "kl" in history[-1]
    assert m["dpo"]["eval"]["rewards/margins"] > 0
