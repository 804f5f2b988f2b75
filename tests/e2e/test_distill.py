"""On-policy distillation on CPU with tiny Gemma 2 models: the loss, a visible behaviour passed from a
teacher to a fresh student on prompts alone, resume after SIGTERM, two processes, bad inputs."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import QUESTIONS, ROOT, divergence_from_logprobs, resumed_equals_uninterrupted, write_jsonl
from gemma2_tune.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
HELD_OUT = ["How is the weather?", "Who are you?", "What is your name?"]
FP32 = ["--set", "quantization.load_in_4bit=false", "--set", "model.dtype=float32", "--set", "teacher.load_in=full",
        "--set", "lora.dropout=0", "--set", "distill.max_completion_length=6", "--set", "training.learning_rate=5e-3",
        "--set", "training.per_device_train_batch_size=4", "--set", "training.gradient_accumulation_steps=1"]


def chat_rows(questions, answer=None):
    return [{"messages": [{"role": "user", "content": q}] + ([{"role": "assistant", "content": answer}]
                                                             if answer else [])} for q in questions]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model_dir):
    """A tiny Gemma 2 fully fine-tuned to answer every question with 'ok' and stop."""
    tmp = tmp_path_factory.mktemp("teacher")
    data = write_jsonl(tmp / "ok.jsonl", chat_rows(QUESTIONS, "ok"))
    out = tmp / "teacher"
    r = runner.invoke(app, ["sft", "--model", "builtin:tiny-gemma2", "--dataset", str(data), "-o", str(out),
                            "--max-steps", "40", "--set", "quantization.load_in_4bit=false", "--set", "lora.enabled=false",
                            "--set", "model.dtype=float32", "--set", "training.learning_rate=1e-3",
                            "--set", "data.packing=false", "--set", "training.gradient_accumulation_steps=1",
                            "--set", "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    for q in HELD_OUT:
        r = runner.invoke(app, ["chat", "--model", str(out), "--prompt", q, "--max-new-tokens", "10"])
        assert r.stdout.strip() == "ok"  # the behaviour to pass on, visible on unseen questions
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", chat_rows(QUESTIONS))


def distill(*args):
    return runner.invoke(app, ["distill", "--model", "builtin:tiny-gemma2", *FP32, *args])


def test_the_loss_is_the_divergence_of_both_soft_capped_distributions(teacher, tiny_model_dir, tmp_path):
    """Both divergences in our trainer (ours, distill.loss=completion_rows, and TRL's chunked one) == a direct
    computation from both models' logits (fp32, 1e-5); the student's gradients (all weights, the tied lm_head /
    embedding included: full fine-tuning) of the two equal within 5e-5 of their largest entry."""
    from transformers import AutoModelForCausalLM

    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.distill import DistillConfig
    from gemma2_tune.models.loading import load_tokenizer
    from gemma2_tune.training.distill import build_trainer, distill_args
    from gemma2_tune.training.launch import Launch

    tokenizer = load_tokenizer(str(tiny_model_dir))
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, attn_implementation="eager", dtype=torch.float32)
    assert student.config.final_logit_softcapping == teacher_model.config.final_logit_softcapping == 30.0
    g = torch.Generator().manual_seed(0)
    prompt, completion = torch.randint(10, 900, (2, 7), generator=g), torch.randint(10, 900, (2, 5), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :3] = 0  # left padding
    completion_mask = torch.ones_like(completion)
    completion_mask[0, 3:] = 0  # a completion that stopped early
    inputs = {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
              "completion_mask": completion_mask}
    ids, mask = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1)
    for beta, temperature in ((0.5, 2.0), (0.0, 1.0), (1.0, 0.7)):
        cfg = resolve(None, ["model.name_or_path=builtin:tiny-gemma2", f"teacher.name_or_path={teacher}",
                             f"distill.beta={beta}", f"distill.temperature={temperature}", "lora.enabled=false",
                             "quantization.load_in_4bit=false", "model.dtype=float32", "teacher.load_in=full",
                             f"output.dir={tmp_path / 'x'}"], schema=DistillConfig).config
        args = distill_args(cfg, tmp_path / "x", Launch("single"), 5, 1)
        trainer = build_trainer(cfg, student, teacher_model, tokenizer, [[{"role": "user", "content": "Hi"}]], None,
                                args, Launch("single"))
        losses, grads = {}, {}
        for rows in (True, False):
            trainer.completion_rows = rows
            losses[rows], _, n = trainer._compute_loss(student, inputs, None)
            grads[rows] = torch.autograd.grad(losses[rows], [p for p in student.parameters() if p.requires_grad])
        for ours, trl in zip(grads[True], grads[False]):
            assert (ours - trl).abs().max() <= 5e-5 * trl.abs().max().clamp(min=1e-6)
        with torch.no_grad():
            logits_s = student(input_ids=ids, attention_mask=mask).logits[:, 6:-1] / temperature  # soft-capped
            logits_t = teacher_model(input_ids=ids, attention_mask=mask).logits[:, 6:-1] / temperature
        per_token = divergence_from_logprobs(logits_s.float().log_softmax(-1), logits_t.float().log_softmax(-1), beta)
        direct = (per_token * completion_mask).sum() / completion_mask.sum()
        assert int(n) == int(completion_mask.sum())
        for rows, loss in losses.items():
            assert abs(loss.item() - direct.item()) <= 1e-5, (rows, beta, loss.item(), direct.item())


@pytest.fixture(scope="module")
def distilled(teacher, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    r = distill("--teacher", str(teacher), "--dataset", str(prompts), "-o", str(out), "--max-steps", "80",
                "--set", "training.logging_steps=10", "--set", "training.save_steps=null",
                "--set", "data.eval_fraction=0.25", "--set", "training.eval_steps=20")
    assert r.exit_code == 0, r.output
    return out, r.output


def test_a_fresh_student_learns_the_teachers_behaviour_from_prompts_alone(distilled, teacher):
    out, output = distilled
    for q in HELD_OUT:  # never seen, not in the prompts
        r = runner.invoke(app, ["chat", "--adapter", str(out), "--prompt", q, "--max-new-tokens", "10"])
        assert r.exit_code == 0 and r.stdout.strip() == "ok", r.output
        base = runner.invoke(app, ["chat", "--model", "builtin:tiny-gemma2", "--prompt", q, "--max-new-tokens", "10"])
        assert base.stdout.strip() != "ok"  # the random student did not answer that way before
    m = json.loads((out / "run.json").read_text())
    assert m["command"] == "distill" and m["status"] == "completed" and m["global_step"] == 80
    d = m["distill"]
    assert d["teacher"] == str(teacher) and d["beta"] == 0.5 and d["on_policy_fraction"] == 1.0
    assert d["tokens_generated"] > 0 and d["generation_s"] > 0 and len(d["divergence_history"]) >= 8
    assert d["loss"]["loss"] == "completion_rows" and d["sampling"] == "inverse_cdf"  # distill.loss=auto on a CPU
    evals = [e["eval_divergence"] for e in m["training"]["eval_history"]]
    assert len(evals) >= 3 and evals[-1] < evals[0] / 2, evals  # on held-out prompts, the student's own completions
    assert m["teacher"]["final_softcap"] == 30.0 and m["teacher"]["attn_implementation"] == "eager"
    assert "generating" in output and "teacher:" in output and "divergence: JSD" in output
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert "tags: [gemma2, gemma2-tune, distill]" in (out / "README.md").read_text()


def test_the_student_works_with_merge_and_eval(distilled, tmp_path):
    out, _ = distilled
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(merged)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["chat", "--adapter", str(merged), "--prompt", HELD_OUT[0], "--max-new-tokens", "10"])
    assert r.exit_code == 0 and r.stdout.strip() == "ok" and ", float32," in r.stderr  # loaded as it was merged
    held = write_jsonl(tmp_path / "held.jsonl", chat_rows(HELD_OUT, "ok"))
    r = runner.invoke(app, ["eval", "--adapter", str(out), "--dataset", str(held)])
    assert r.exit_code == 0, r.output
    losses = {line.split()[0]: float(line.split()[1]) for line in r.output.splitlines()
              if line.startswith(("base", "fine-tuned"))}
    assert losses["fine-tuned"] < losses["base"] - 1.0, r.output


RESUME = ["--max-steps", "12", "--set", "training.save_steps=4", "--set", "training.logging_steps=1"]


@pytest.mark.heavy  # the lifecycle's resume is held by sft's, dpo's and rl's equality tests too
def test_resume_after_sigterm_equals_an_uninterrupted_run(teacher, prompts, tmp_path):
    common = ["distill", "--model", "builtin:tiny-gemma2", *FP32, "--teacher", str(teacher), "--dataset", str(prompts),
              *RESUME]
    m, ref = resumed_equals_uninterrupted(common, tmp_path, "step 5/", 12)
    assert m["distill"]["tokens_generated"] == ref["distill"]["tokens_generated"]  # totals over both attempts


def test_bad_inputs_end_with_a_message_before_any_weights_load(teacher, prompts, tmp_path, tiny_model_dir):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_sft import build_tokenizer

    other_vocab = tmp_path / "other-vocab"
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    Gemma2ForCausalLM(Gemma2Config(**{**cfg, "vocab_size": 512})).save_pretrained(other_vocab)
    build_tokenizer(512).save_pretrained(other_vocab)
    r = distill("--teacher", str(other_vocab), "--dataset", str(prompts), "-o", str(tmp_path / "a"))
    assert r.exit_code == 2 and "vocabulary of 512 entries" in r.output and "Traceback" not in r.output
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(llama)
    r = distill("--teacher", str(llama), "--dataset", str(prompts), "-o", str(tmp_path / "b"))
    assert r.exit_code == 2 and "teacher.name_or_path" in r.output and "'llama' model" in r.output
    no_user = write_jsonl(tmp_path / "no-user.jsonl", [{"messages": [{"role": "system", "content": "Be kind."}]},
                                                        {"messages": [{"role": "assistant", "content": "Hello."}]}])
    r = distill("--teacher", str(teacher), "--dataset", str(no_user), "-o", str(tmp_path / "c"))
    assert r.exit_code == 2 and "no usable prompts" in r.output and "no-user.jsonl line 1" in r.output
    r = runner.invoke(app, ["distill", "--model", "google/gemma-2-9b", "--teacher", "google/gemma-3-1b-it", "--dry-run"])
    assert r.exit_code == 2 and "share the tokenizer" in r.output
    r = runner.invoke(app, ["distill", "--model", "google/gemma-2-9b", "--teacher", "google/gemma-2-2b-it", "--dry-run",
                            "-o", str(tmp_path / "d")])
    assert r.exit_code == 0 and "smaller than the student" in r.output
    for name in ("a", "b", "c"):
        assert not (tmp_path / name / "adapter_model.safetensors").exists()
    sft_run = tmp_path / "sft"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "-o", str(sft_run), "--max-steps", "2",
                            "--set", "training.save_steps=1"])
    assert r.exit_code == 0, r.output
    (sft_run / "run.json").write_text((sft_run / "run.json").read_text().replace('"completed"', '"interrupted"'))
    r = distill("--teacher", str(teacher), "--dataset", str(prompts), "-o", str(sft_run), "--resume")
    assert r.exit_code == 2 and "holds a `sft` run" in r.output


def test_prompts_render_as_serving_renders_them(tokenizer):
    """The prompt TRL renders with the run's template == our renderer's (Gemma 3's verbatim system text too)."""
    from gemma2_tune.config.schema import DataSection
    from gemma2_tune.data.prompts import build_prompts
    from gemma2_tune.data.sources import Row
    from gemma2_tune.data.template import use_run_template
    from gemma2_tune.data.turns import normalise, render
    from gemma2_tune.families import GEMMA2, GEMMA3_TEXT

    row = {"messages": [{"role": "system", "content": "  Be brief.  "}, {"role": "human", "content": "Hi"},
                        {"role": "gpt", "content": "Hello."}, {"role": "user", "content": " More? "},
                        {"role": "assistant", "content": "Sure."}]}
    saved = tokenizer.chat_template  # a session fixture: left as found
    for family, policy in ((GEMMA2, "fold"), (GEMMA2, "drop"), (GEMMA3_TEXT, "fold"), (GEMMA3_TEXT, "drop")):
        try:
            data = DataSection(dataset="x", system_policy=policy)
            use_run_template(tokenizer, family, policy)
            (prompt,), report, _ = build_prompts([Row("r", row)], tokenizer, data, family, 16)
            assert prompt[-1] == {"role": "user", "content": " More? "}
            expected = render(normalise(row["messages"][:4], policy, allow_open_end=True, family=family),
                              add_generation_prompt=True).text
            assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == expected
            assert report.notes["reference answer set aside (on-policy: the student writes its own)"] == 1
        finally:
            tokenizer.chat_template = saved


def test_prompt_only_rows_are_read_as_their_conversation(tokenizer):
    """TRL's prompt-only format: {"prompt": "text"} is one user turn, {"prompt": [messages]} that conversation; a
    prompt with a completion is still a chat row (its answer set aside), a lone completion still a bad row."""
    from gemma2_tune.config.schema import DataSection
    from gemma2_tune.data.prompts import build_prompts
    from gemma2_tune.data.sources import Row
    from gemma2_tune.families import GEMMA2

    rows = [Row("a", {"prompt": "Say hello"}),
            Row("b", {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."},
                                 {"role": "user", "content": "More?"}]}),
            Row("c", {"prompt": "Q", "completion": "A"}), Row("d", {"completion": "A"}), Row("e", ["not", "a row"]),
            Row("f", {"prompt": 42})]
    prompts, report, _ = build_prompts(rows, tokenizer, DataSection(dataset="x"), GEMMA2, 16)
    assert prompts == [[{"role": "user", "content": "Say hello"}],
                       [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."},
                        {"role": "user", "content": "More?"}],
                       [{"role": "user", "content": "Q"}]]
    assert report.rows_bad == 3 and report.bad_rows[0].startswith("d: ") and report.bad_rows[1].startswith("e: ")
    assert report.bad_rows[2] == "f: 'prompt' is int: expected text or a list of messages"


def test_fewer_prompts_than_one_batch_is_refused_and_nothing_is_called_completed(tmp_path):
    """3 prompts, a batch of 4: the trainer dropped the partial batch and ran 0 steps; the run then crashed in its
    summary with an untrained adapter saved and run.json saying 'completed'."""
    data = write_jsonl(tmp_path / "p3.jsonl", [{"prompt": q} for q in QUESTIONS[:3]])
    out = tmp_path / "run"
    r = distill("--teacher", "builtin:tiny-gemma2", "--dataset", str(data), "-o", str(out), "--max-steps", "1",
                "--set", "training.per_device_train_batch_size=4", "--set", "training.gradient_accumulation_steps=1")
    assert r.exit_code == 2 and "3 usable prompts, fewer than one batch" in r.output, r.output
    assert "Traceback" not in r.output and not (out / "run.json").exists()  # refused before the run is written


def test_preview_of_a_distill_recipe_shows_prompts(tmp_path, prompts):
    recipe = tmp_path / "d.yaml"
    recipe.write_text(f"model:\n  name_or_path: builtin:tiny-gemma2\nteacher:\n  name_or_path: builtin:tiny-gemma2\n"
                      f"data:\n  dataset: {prompts}\ndistill:\n  max_completion_length: 6\n")
    r = runner.invoke(app, ["preview", "--recipe", str(recipe), "-n", "2"])
    assert r.exit_code == 0, r.output
    assert r.output.count("── prompt") == 2 and "the student writes up to 6 more" in r.output
    assert "<start_of_turn>user\nWhat is the time?<end_of_turn>\n<start_of_turn>model\n⟦" in r.output
    assert "16 read, 16 kept" in r.output
