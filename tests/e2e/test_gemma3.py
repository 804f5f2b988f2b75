"""Gemma 3 text models end to end on a tiny Gemma 3 (local, random): the turn format with Gemma 3's system
handling, packing under eager and sdpa, QLoRA and full fine-tuning, chat, merge, eval, plan."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import QUESTIONS, write_jsonl
from gemma2_tune.cli import app
from gemma2_tune.data.turns import BadRow, normalise, render
from gemma2_tune.families import GEMMA3_TEXT

runner = CliRunner()


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tune_home):
    from gemma2_tune.models.builtin import builtin_path

    return builtin_path("builtin:tiny-gemma3")


@pytest.fixture(scope="module")
def gemma3_tokenizer(tiny_gemma3_dir):
    from gemma2_tune.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_gemma3_dir))


def test_system_text_is_folded_the_way_gemma3s_template_does():
    turns = normalise(msgs(("system", " Be brief. "), ("user", " Hi "), ("assistant", "Yo")), "fold", family=GEMMA3_TEXT)
    assert turns[0].text == " Be brief. \n\nHi"  # verbatim system text, trimmed user text
    with pytest.raises(BadRow, match="second system message"):
        normalise(msgs(("system", "a"), ("system", "b"), ("user", "c"), ("assistant", "d")), "fold", family=GEMMA3_TEXT)
    assert normalise(msgs(("system", "a"), ("user", "c"), ("assistant", "d")), "drop", family=GEMMA3_TEXT)[0].text == "c"
    # Gemma 2 joins trimmed system texts
    assert normalise(msgs(("system", " a "), ("system", "b"), ("user", "c"), ("assistant", "d")), "fold")[0].text == \
        "a\n\nb\n\nc"


@pytest.mark.parametrize("conversation", [
    msgs(("user", "Hi"), ("assistant", "Hello."), ("user", "More?"), ("assistant", "Sure.")),
    msgs(("system", "Be brief.\n"), ("user", "  Hi "), ("assistant", " Hello. ")),
    msgs(("system", "Tu es un pirate. ☠"), ("user", "def f(x):\n    return x"), ("assistant", "```python\nf(1)\n```")),
])
def test_saved_template_renders_what_we_train(gemma3_tokenizer, conversation):
    ours = render(normalise(conversation, "fold", family=GEMMA3_TEXT)).text
    assert gemma3_tokenizer.apply_chat_template(conversation, tokenize=False) == ours
    prompt = conversation[:-1]
    assert gemma3_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == render(
        normalise(prompt, "fold", allow_open_end=True, family=GEMMA3_TEXT), add_generation_prompt=True).text


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_packed_rows_equal_rows_alone_under_both_kernels(tiny_gemma3_dir, kernel):
    """Gemma 3's 3:1 sliding/global layers, rows longer than the window, fp32, 1e-5."""
    from transformers import AutoModelForCausalLM

    from gemma2_tune.data.examples import Example
    from gemma2_tune.data.packing import BlockCollator, best_fit_decreasing, pack
    from gemma2_tune.data.turns import IGNORE_INDEX

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, attn_implementation=kernel, dtype=torch.float32).eval()
    window, vocab = model.config.sliding_window, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in [3 * window, 2 * window + 5, window + 1, 9, 40, 70, 1]:
        ids = [2] + torch.randint(10, vocab, (n - 1,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    blocks = pack(examples, capacity=128)
    batch = BlockCollator(pad_token_id=0)([vars(b) for b in blocks])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst = 0.0
        for b, members in enumerate(best_fit_decreasing([len(e.input_ids) for e in examples], 128)):
            start = 0
            for i in sorted(members):
                n = len(examples[i].input_ids)
                alone = model(input_ids=torch.tensor([examples[i].input_ids]), use_cache=False).logits[0]
                worst = max(worst, (packed[b, start:start + n] - alone).abs().max().item())
                start += n
    assert worst <= 1e-5, worst
    # negative control: the same blocks with a 2D all-ones mask let rows see each other
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
    assert (leaked - packed).abs().max().item() > 1e-3




@pytest.fixture(scope="module")
def ok_run(tmp_path_factory, tiny_gemma3_dir):
    """A QLoRA run of the tiny Gemma 3 (packed rows, system messages folded) taught to answer 'ok'."""
    tmp = tmp_path_factory.mktemp("g3ok")
    rows = [{"messages": ([{"role": "system", "content": "Answer briefly."}] if i % 2 else [])
             + [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
            for i, q in enumerate(QUESTIONS)]
    data = write_jsonl(tmp / "ok.jsonl", rows)
    out = tmp / "run"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", "builtin:tiny-gemma3", "--dataset",
                            str(data), "-o", str(out), "--max-steps", "40", "--set", "data.max_length=64",
                            "--set", "training.gradient_accumulation_steps=1", "--set", "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    return out, tmp, r.output


def test_qlora_run_records_the_family(ok_run):
    out, _, output = ok_run
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["model"]["family"] == "gemma3"
    assert (m["model"]["attention_softcap"], m["model"]["final_softcap"]) == (None, None)
    assert m["model"]["quantization"]["bnb_4bit_quant_type"] == "nf4" and m["data"]["packing"] is True
    assert m["model"]["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    assert "no soft-caps" in output and "Gemma 3 text" in output
    assert "tags: [gemma3," in (out / "README.md").read_text()


def test_chat_answers_ok_and_stops(ok_run):
    out, _, _ = ok_run
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--prompt", "What is the weather like?",
                            "--system", "Answer briefly.", "--max-new-tokens", "30"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "ok"


def test_eval_and_merge_to_a_plain_pipeline(ok_run, tmp_path):
    out, tmp, _ = ok_run
    held = write_jsonl(tmp / "held.jsonl", [{"messages": msgs(("user", q), ("assistant", "ok"))}
                                           for q in ["Is it late?", "Do cats purr?", "What is blue?"]])
    r = runner.invoke(app, ["eval", "--adapter", str(out), "--dataset", str(held)])
    assert r.exit_code == 0, r.output
    losses = {line.split()[0]: float(line.split()[1]) for line in r.output.splitlines()
              if line.startswith(("base", "fine-tuned"))}
    assert losses["fine-tuned"] < losses["base"] - 2.0, r.output
    merged = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(merged)])
    assert r.exit_code == 0, r.output
    assert json.loads((merged / "config.json").read_text())["model_type"] == "gemma3_text"
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(merged))
    answer = pipe(msgs(("system", "Answer briefly."), ("user", "How is the weather?")), max_new_tokens=20,
                  do_sample=False)
    assert answer[0]["generated_text"][-1]["content"].strip() == "ok"


def test_full_fine_tuning_with_sdpa(tmp_path, tiny_gemma3_dir):
    out = tmp_path / "full"
    r = runner.invoke(app, ["sft", "--recipe", "quickstart-cpu", "--model", "builtin:tiny-gemma3", "-o", str(out),
                            "--max-steps", "3", "--set", "quantization.load_in_4bit=false", "--set", "lora.enabled=false",
                            "--set", "model.attn_implementation=sdpa", "--set", "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    assert m["model"]["attn_implementation"] == "sdpa" and m["model"]["trainable_params"] == m["model"]["total_params"]
    assert (out / "model.safetensors").is_file()


def test_sdpa_stays_refused_for_gemma2():
    r = runner.invoke(app, ["sft", "--model", "builtin:tiny-gemma2", "--set", "model.attn_implementation=sdpa",
                            "--dry-run"])
    assert r.exit_code == 2 and "soft-capping" in r.output


def test_plan_knows_the_published_gemma3_shapes():
    r = runner.invoke(app, ["plan", "--model", "google/gemma-3-1b-it", "--gpu", "l4-24gb"])
    assert r.exit_code == 0, r.output
    assert "1.00B parameters" in r.output and "published Gemma 3 text 1B shape" in r.output
    r = runner.invoke(app, ["plan", "--model", "google/gemma-3-270m", "--gpu", "t4-16gb", "--set", "model.dtype=float32"])
    assert "0.27B parameters" in r.output and "vocab 262,144" in r.output


def test_preview_shows_gemma3s_system_folding(tmp_path, tiny_gemma3_dir):
    data = write_jsonl(tmp_path / "s.jsonl", [{"messages": msgs(("system", "Be brief. "), ("user", "Hi"),
                                                                ("assistant", "Hello."))}])
    r = runner.invoke(app, ["preview", "--model", "builtin:tiny-gemma3", "--dataset", str(data)])
    assert r.exit_code == 0, r.output
    assert "<start_of_turn>user\nBe brief. \n\nHi<end_of_turn>" in r.output  # verbatim, as Gemma 3's template
    assert "⟦Hello.<end_of_turn>⟧" in r.output
    r = runner.invoke(app, ["preview", "--model", "builtin:tiny-gemma2", "--dataset", str(data)])
    assert "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>" in r.output  # trimmed, as Gemma 2's fold
