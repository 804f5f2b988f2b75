"""Online RL (`gemma2-tune rl`) on CPU with tiny Gemma 2 models: the loss's log-probabilities against a plain
soft-capped forward, bad reward functions and reward models stopped before anything is written, the plan's terms,
a short run with a reward function and a reward model."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import QUESTIONS, ROOT, resumed_equals_uninterrupted, write_jsonl
from gemma2_tune.cli import app

runner = CliRunner()
REWARDS = ROOT / "recipes" / "rewards" / "starts_with.py"
FP32 = ["--set", "quantization.load_in_4bit=false", "--set", "model.dtype=float32", "--set", "lora.dropout=0",
        "--set", "rl.max_completion_length=4", "--set", "data.max_length=64", "--set", "rl.num_generations=4",
        "--set", "training.per_device_train_batch_size=4", "--set", "training.gradient_accumulation_steps=1",
        "--set", "training.save_steps=null", "--set", "training.logging_steps=1"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl",
                       [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS])


def rl(*args):
    return runner.invoke(app, ["rl", "--model", "builtin:tiny-gemma2", *FP32, *args])


def built_trainer(tmp_path, tiny_model_dir, model, temperature=1.0):
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.rl import RlConfig
    from gemma2_tune.models.loading import load_tokenizer
    from gemma2_tune.training.launch import Launch
    from gemma2_tune.training.rl import lm_heads, rl_args, trainer_classes
    from datasets import Dataset

    cfg = resolve(None, ["model.name_or_path=builtin:tiny-gemma2", "lora.enabled=false",
                         "quantization.load_in_4bit=false", "model.dtype=float32", f"rl.temperature={temperature}",
                         f"rl.reward_functions=[{{path: {REWARDS}, name: brevity}}]", "rl.num_generations=2",
                         "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1",
                         f"output.dir={tmp_path / 'x'}"], schema=RlConfig).config
    tokenizer = load_tokenizer(str(tiny_model_dir))
    grpo, _ = trainer_classes()
    trainer = grpo(model=model, reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                   args=rl_args(cfg, tmp_path / "x", Launch("single"), [1.0]),
                   train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi"}]] * 2}),
                   processing_class=tokenizer)
    assert lm_heads(trainer, cfg, Launch("single"))["lm_head"] == "supervised_chunked"  # as the runner does
    return trainer


def loud_tiny_gemma2(tiny_model_dir):
    """The tiny Gemma 2 with its tied embeddings scaled up: logits of tens (as a real model's), where the final
    soft-cap at 30 changes the distribution (random small logits would hide a missing cap)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0).add_(39.0)  # Gemma's norm scales by (1 + weight)
    return model


def test_the_loss_logprobs_are_a_plain_soft_capped_forward(tiny_model_dir, tmp_path):
    """The loss's per-token log-probabilities (our LM head in TRL's trainer) == log_softmax(30 tanh(z/30) / T)
    of a plain eager forward, fp32, 1e-5; and with the final soft-cap removed from the model, the probe refuses it."""
    from gemma2_tune.errors import UserError
    from gemma2_tune.families import GEMMA2
    from gemma2_tune.training.rl import logprob_gap

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 900, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded prompt
    mask[2, -2:] = 0  # a completion that stopped early
    for temperature in (1.0, 0.7):
        model = loud_tiny_gemma2(tiny_model_dir)
        assert model.config.final_logit_softcapping == 30.0
        trainer = built_trainer(tmp_path, tiny_model_dir, model, temperature)
        with torch.no_grad():  # the model's own forward (what generation samples from), soft-capped by transformers
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -6:-1].float()
        assert logits.abs().max() > 10  # the cap matters at these logits
        plain = (logits / temperature).log_softmax(-1).gather(-1, ids[:, -5:].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            ours, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5)
        keep = mask[:, -5:].bool()
        assert (ours - plain)[keep].abs().max().item() <= 1e-5
        assert logprob_gap(trainer, ids, mask, 5, GEMMA2.final_softcap, temperature)[0] <= 1e-5
    # the same model without its final soft-cap: generation and the fused head both lose it; the probe says so
    model = loud_tiny_gemma2(tiny_model_dir)
    model.config.final_logit_softcapping = None
    trainer = built_trainer(tmp_path, tiny_model_dir, model)
    gap = logprob_gap(trainer, ids, mask, 5, GEMMA2.final_softcap, 1.0)[0]
    assert gap > 1e-2, gap
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.rl import RlConfig
    from gemma2_tune.models.loading import load_tokenizer
    from gemma2_tune.training.rl import check_logprob_parity

    cfg = resolve(None, ["model.name_or_path=builtin:tiny-gemma2", "model.dtype=float32",
                         f"rl.reward_functions=[{{path: {REWARDS}, name: brevity}}]"], schema=RlConfig).config
    with pytest.raises(UserError, match="differ by .* nats .* from a plain forward soft-capped at 30.0 .Gemma 2's final"):
        check_logprob_parity(trainer, load_tokenizer(str(tiny_model_dir)), [{"role": "user", "content": "Hi"}],
                             GEMMA2, cfg)


def test_in_bf16_the_probe_allows_rounding_and_still_refuses_a_missing_soft_cap(tiny_model_dir, tmp_path):
    """bf16 rounds logits of tens by up to 1/16 to 1/8 (real Gemma 3 270M reaches |logit| 65: its first RL run was
    refused at a 0.233-nat gap under a fixed 0.1 bound, with TRL's bf16 head). The tolerance follows the largest
    logit (probe_tolerance). Our head projects the bf16 hidden states in fp32 tiles, as the probe's plain forward
    does, so the loud model's gap is far inside it; the same model without its soft-cap is refused."""
    from gemma2_tune.config.layering import resolve
    from gemma2_tune.config.rl import RlConfig
    from gemma2_tune.errors import UserError
    from gemma2_tune.families import GEMMA2
    from gemma2_tune.models.loading import load_tokenizer
    from gemma2_tune.training.rl import check_logprob_parity, logprob_gap, probe_tolerance

    assert probe_tolerance("bfloat16", 65.5, None, 1.0) == 2 * 0.25 + 0.01  # [64, 128): half a unit is 0.25
    assert probe_tolerance("bfloat16", 40.0, 30.0, 0.5) == (2 * (0.125 + 3 * 0.0625) / 0.5) + 0.01
    assert probe_tolerance("float32", 65.5, 30.0, 1.0) == 1e-4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 900, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    model = loud_tiny_gemma2(tiny_model_dir).to(torch.bfloat16)
    trainer = built_trainer(tmp_path, tiny_model_dir, model)
    gap, largest = logprob_gap(trainer, ids, mask, 5, GEMMA2.final_softcap, 1.0)
    assert largest > 10 and gap <= 1e-4 < probe_tolerance("bfloat16", largest, GEMMA2.final_softcap, 1.0), (gap, largest)
    cfg = resolve(None, ["model.name_or_path=builtin:tiny-gemma2", "model.dtype=bfloat16",
                         f"rl.reward_functions=[{{path: {REWARDS}, name: brevity}}]"], schema=RlConfig).config
    tokenizer = load_tokenizer(str(tiny_model_dir))
    check_logprob_parity(trainer, tokenizer, [{"role": "user", "content": "Hi"}], GEMMA2, cfg)  # passes
    model.config.final_logit_softcapping = None
    with pytest.raises(UserError, match="more than bfloat16 rounding explains"):
        check_logprob_parity(built_trainer(tmp_path, tiny_model_dir, model), tokenizer,
                             [{"role": "user", "content": "Hi"}], GEMMA2, cfg)


BAD = '''
import math
def raises(completions, **kwargs):
    raise RuntimeError("boom")
def short(completions, **kwargs):
    return [1.0]
def nan(completions, **kwargs):
    return [math.nan] * len(completions)
def words(completions, **kwargs):
    return ["many"] * len(completions)
def numerals(completions, **kwargs):
    return ["1.0"] * len(completions)
def by_key(completions, **kwargs):
    return {i: 1.0 for i in range(len(completions))}
def huge(completions, **kwargs):
    return [1e39] * len(completions)
def exits(completions, **kwargs):
    import sys
    sys.exit(3)
def needs_answer(completions, answer, **kwargs):
    return [1.0] * len(completions)
NOT_A_FUNCTION = 3
'''


@pytest.mark.parametrize("name, says", [
    ("raises", "reward function {f}:raises: raised RuntimeError: boom"),
    ("short", "reward function {f}:short: returned 1 rewards for 2 completions"),
    ("nan", "reward function {f}:nan: returned nan for completion 0"),
    ("words", "reward function {f}:words: returned 'many' (str) for completion 0 ([{{'role': 'assistant', "
              "'content': ''}}]); rewards must be numbers"),
    ("numerals", "reward function {f}:numerals: returned '1.0' (str) for completion 0"),  # was read as 1.0
    ("by_key", "reward function {f}:by_key: must return a list of numbers (one per completion), returned dict"),
    ("huge", "reward function {f}:huge: returned 1e+39 for completion 0 ([{{'role': 'assistant', 'content': ''}}]); "
             "a reward's magnitude must stay within 1e+15"),  # was: a traceback in the log callback, later
    ("exits", "reward function {f}:exits: called sys.exit(3); a reward function returns its rewards"),  # was exit 3
    ("needs_answer", "reward function {f}:needs_answer: its parameter 'answer' is no column of any prompt row (the "
                     "rows' columns: none)"),
    ("missing", "rl.reward_functions[0].name: {f} defines no 'missing' (functions there: by_key, exits, huge, nan, "
                "needs_answer, numerals, raises, short, words)"),
    ("NOT_A_FUNCTION", "rl.reward_functions[0].name: {f}:NOT_A_FUNCTION is a int, not a function"),
])
def test_a_bad_reward_function_stops_the_run_naming_it_before_anything_is_written(prompts, tmp_path, name, says):
    bad = tmp_path / "bad_rewards.py"
    bad.write_text(BAD)
    out = tmp_path / "run"
    r = rl("--dataset", str(prompts), "-o", str(out), "--reward-function", f"{bad}:{name}")
    assert r.exit_code == 2, r.output
    assert says.format(f=bad) in r.output and "Traceback" not in r.output
    assert not out.exists() or not any(out.iterdir())


def test_a_reward_module_that_exits_on_import_is_a_failure_of_that_function(prompts, tmp_path):
    """sys.exit(0) on import ended the run with exit 0 and nothing trained."""
    module = tmp_path / "exits.py"
    module.write_text("import sys\nsys.exit(0)\ndef f(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    out = tmp_path / "run"
    r = rl("--dataset", str(prompts), "-o", str(out), "--reward-function", f"{module}:f")
    assert r.exit_code == 2 and f"rl.reward_functions[0].path: importing {module} failed: called sys.exit(0)" \
        in r.output, r.output
    assert not out.exists() or not any(out.iterdir())


def test_missing_files_and_rewards_are_config_errors(prompts, tmp_path):
    r = rl("--dataset", str(prompts), "-o", str(tmp_path / "a"), "--reward-function", str(tmp_path / "nope.py") + ":f")
    assert r.exit_code == 2 and f"rl.reward_functions[0].path: {tmp_path / 'nope.py'}: no such file" in r.output
    r = rl("--dataset", str(prompts), "-o", str(tmp_path / "b"))
    assert r.exit_code == 2 and "rl: no reward" in r.output
    r = rl("--dataset", str(prompts), "-o", str(tmp_path / "c"), "--reward-function", "no-colon")
    assert r.exit_code == 2 and "--reward-function no-colon: expected PATH.py:NAME" in r.output
    r = rl("--dataset", str(prompts), "-o", str(tmp_path / "d"), "--reward-function", f"{REWARDS}:brevity",
           "--set", "rl.num_generations=3")
    assert r.exit_code == 2 and "must be whole groups" in r.output
    r = rl("--dataset", str(prompts), "-o", str(tmp_path / "e"), "--reward-model", str(ROOT / "recipes"))
    assert r.exit_code == 2 and "reward_model.name_or_path" in r.output
    for name in "abcde":
        assert not (tmp_path / name).exists()


def test_the_plan_counts_generation_the_group_and_the_reward_model(tmp_path):
    r = runner.invoke(app, ["plan", "--recipe", "gemma-2-9b-grpo-qlora", "--gpu", "h100-80gb"])
    assert r.exit_code == 0, r.output
    assert "generation KV cache (16 completions: 2 prompts x group 8)" in r.output
    assert "reference forward (no gradients)" in r.output
    plain = r.output
    r = runner.invoke(app, ["plan", "--recipe", "gemma-2-9b-grpo-qlora", "--gpu", "h100-80gb",
                            "--set", "reward_model.name_or_path=google/gemma-2-2b", "--set", "rl.beta=0"])
    assert r.exit_code == 0, r.output
    assert "reward_model: google/gemma-2-2b" in r.output and "reward model weights" in r.output
    assert "reference forward" not in r.output and plain != r.output


@pytest.mark.slow
def test_a_short_run_with_a_reward_function_and_a_reward_model(prompts, tmp_path, tiny_model_dir):
    """A tiny Gemma2ForSequenceClassification (one output) beside a reward function, GRPO and RLOO: run.json says
    what was generated, truncated and rewarded; the adapter is saved and chat loads it."""
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    from gemma2_tune.models.loading import load_tokenizer

    reward_dir = tmp_path / "reward-model"
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(num_labels=1, architectures=["Gemma2ForSequenceClassification"])
    torch.manual_seed(0)
    Gemma2ForSequenceClassification(Gemma2Config(**cfg)).save_pretrained(reward_dir)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(reward_dir)
    for algorithm in ("dr_grpo", "rloo"):
        out = tmp_path / algorithm
        r = rl("--dataset", str(prompts), "-o", str(out), "--max-steps", "2", "--algorithm", algorithm,
               "--reward-function", f"{REWARDS}:brevity=0.5", "--reward-model", str(reward_dir))
        assert r.exit_code == 0, r.output
        m = json.loads((out / "run.json").read_text())
        assert m["status"] == "completed" and m["global_step"] == 2 and m["method"] == "rl"
        d = m["rl"]
        assert d["algorithm"] == algorithm and d["trainer"] == ("RLOOTrainer" if algorithm == "rloo" else "GRPOTrainer")
        assert d["completions"] == 8 and 0 <= d["completions_truncated"] <= 8 and d["tokens_generated"] > 0
        assert d["generation_s"] > 0 and d["logprob_probe_max_gap_nats"] <= 1e-4 and d["sampling"] == "inverse_cdf"
        assert d["reward_model"] == str(reward_dir) and d["reward_model_template"] == "own"
        assert len(d["reward_history"]) == 2 and all(math.isfinite(e["reward"]) for e in d["reward_history"])
        assert "reward model:" in r.output and "log-prob probe" in r.output and "generating" in r.output
        assert (out / "adapter_model.safetensors").is_file()
    r = runner.invoke(app, ["chat", "--adapter", str(tmp_path / "rloo"), "--prompt", "Hi", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------------------- learning what is rewarded
WORD_REWARD = f"{REWARDS.parent / 'starts_with.py'}:starts_with_word"  # pays answers whose first word is "Hello"
LEARN = ["--set", "rl.max_completion_length=16", "--set", "training.learning_rate=2e-3", "--max-steps", "30",
         "--set", "training.per_device_train_batch_size=8", "--set", "rl.algorithm=dapo"]


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    """The shipped `greetings` data: a starting policy taught to answer 'Hello, friend.' once in 4 and 'Sure ...'
    otherwise (a full fine-tune of the tiny Gemma 2: its greedy answers start with 'Sure'); and one RL run from
    it on the same prompts, rewarded for a first word 'Hello', with an EMA of its policy. Held-out prompts:
    `greetings-held-out`."""
    tmp = tmp_path_factory.mktemp("styled")
    start = tmp / "start"
    r = runner.invoke(app, ["sft", "--model", "builtin:tiny-gemma2", "--dataset", "greetings", "-o", str(start),
                            "--max-steps", "150", "--learning-rate", "1e-3", "--set", "lora.enabled=false",
                            "--set", "quantization.load_in_4bit=false", "--set", "model.dtype=float32",
                            "--set", "data.packing=false", "--set", "training.per_device_train_batch_size=8",
                            "--set", "training.gradient_accumulation_steps=1", "--set", "training.save_steps=null",
                            "--set", "training.logging_steps=50"])
    assert r.exit_code == 0, r.output
    prompts, held = "greetings", "greetings-held-out"
    first = tmp / "rl-seed1"
    r = runner.invoke(app, ["rl", "--model", str(start), *FP32, *LEARN, "--dataset", prompts, "-o", str(first),
                            "--reward-function", WORD_REWARD, "--set", "training.ema_decay=0.9",
                            "--set", "training.seed=1"])
    assert r.exit_code == 0, r.output
    return tmp, start, prompts, held, first


def scores(run, held, *extra):
    """eval's reward table for `run` (and its starting model, 'base'), read from its --json: greedy answers, then 4
    samples each. Returns (greedy, sampled, printed output): {model: {column: mean, "first_answer": text, ...}}."""
    common = ["eval", "--adapter", str(run), "--dataset", held, "--max-new-tokens", "16", *extra]
    tables = []
    for mode in ([], ["--temperature", "1", "--samples", "4"]):
        path = run.parent / f"{run.name}-scores.json"
        r = runner.invoke(app, [*common, *mode, "--json", str(path)])
        assert r.exit_code == 0, r.output
        tables.append((json.loads(path.read_text())["results"], r.output))
        print(r.output[r.output.index("answers: "):])  # the table, for `pytest -s`
    return tables[0][0], tables[1][0], tables[0][1] + tables[1][1]


@pytest.mark.slow
def test_rl_with_a_reward_function_teaches_what_it_pays_for_on_held_out_prompts(styled):
    """The starting policy answers every held-out prompt 'Sure ...' greedily (reward 0) and 'Hello' about a third
    of the time or less when sampling; after 30 GRPO steps rewarded for 'Hello', its greedy answers start with it (mean
    reward >= 0.8) and sampled answers do far more often."""
    tmp, start, prompts, held, run = styled
    greedy, sampled, output = scores(run, held, "--reward-function", WORD_REWARD)
    assert greedy["base"]["starts_with_word"] == 0.0 and greedy["base"]["first_answer"].startswith("Sure"), output
    assert greedy["fine-tuned"]["starts_with_word"] >= 0.8, output
    assert greedy["fine-tuned"]["first_answer"].startswith("Hello"), output
    assert sampled["base"]["starts_with_word"] <= 0.5, output
    assert sampled["fine-tuned"]["starts_with_word"] >= sampled["base"]["starts_with_word"] + 0.3, output
    m = json.loads((run / "run.json").read_text())
    assert m["rl"]["final_reward"] > m["rl"]["first_reward"] + 0.3
    assert m["rl"]["initial_adapter"] is None and m["model"]["name_or_path"] == str(start)


@pytest.mark.slow
@pytest.mark.heavy  # the reward-function run above learns the same task; this is the reward-model path's angle
def test_rl_with_a_reward_run_as_the_reward_model_learns_the_same(styled):
    """A `gemma2-tune reward` run trained to prefer 'Hello, friend.' is the only reward: the policy learns to say
    'Hello' (the reward function only measures), and the reward model scores its answers higher than the start's."""
    tmp, start, prompts, held, _ = styled
    pairs = "greetings-pairs"
    judge = tmp / "judge"
    r = runner.invoke(app, ["reward", "--model", str(start), "--dataset", pairs, "-o", str(judge),
                            "--max-steps", "30", "--learning-rate", "5e-3", "--set", "quantization.load_in_4bit=false",
                            "--set", "model.dtype=float32", "--set", "training.per_device_train_batch_size=8",
                            "--set", "training.gradient_accumulation_steps=1", "--set", "training.save_steps=null",
                            "--set", "data.max_length=64"])
    assert r.exit_code == 0, r.output
    out = tmp / "rl-judged"
    r = runner.invoke(app, ["rl", "--model", str(start), *FP32, *LEARN, "--dataset", prompts, "-o", str(out),
                            "--reward-model", str(judge), "--set", "rl.mask_truncated_completions=true"])
    assert r.exit_code == 0, r.output
    assert "reward model: " in r.output and "its own chat template" in r.output
    m = json.loads((out / "run.json").read_text())
    assert m["rl"]["reward_model"] == str(judge) and m["rl"]["reward_functions"] == []
    greedy, sampled, output = scores(out, held, "--reward-function", WORD_REWARD, "--reward-model", str(judge))
    assert greedy["base"]["starts_with_word"] == 0.0 and greedy["fine-tuned"]["starts_with_word"] >= 0.8, output
    assert greedy["fine-tuned"]["reward model"] > greedy["base"]["reward model"] + 1.0, output
    assert sampled["fine-tuned"]["starts_with_word"] >= sampled["base"]["starts_with_word"] + 0.3, output


@pytest.mark.slow
@pytest.mark.heavy  # WARP over two RL policies' EMAs also runs in test_walkthrough.py and test_merge_models.py
def test_warp_over_two_rl_policies_keeps_what_they_learned(styled):
    """WARP on RL policies: two runs (seeds 1 and 2) with an EMA of the policy -> SLERP of the two EMAs -> LITI
    halfway back to the starting policy; eval's reward table scores every stage: each keeps the rewarded style
    (greedy mean >= 0.8 from the start's 0; sampled, each RL stage gains > 0.2 over the start), and LITI, halfway
    back, sits strictly between the start and the SLERP when sampling."""
    tmp, start, prompts, held, first = styled
    second = tmp / "rl-seed2"
    r = runner.invoke(app, ["rl", "--model", str(start), *FP32, *LEARN, "--dataset", prompts, "-o", str(second),
                            "--reward-function", WORD_REWARD, "--set", "training.ema_decay=0.9",
                            "--set", "training.seed=2"])
    assert r.exit_code == 0, r.output
    for run in (first, second):
        ema = json.loads((run / "ema" / "ema.json").read_text())
        assert ema["decay"] == 0.9 and ema["updates"] == 30, ema
    slerp, liti = tmp / "slerp", tmp / "liti"
    r = runner.invoke(app, ["merge-models", "--method", "slerp", "--models", str(first / "ema"), str(second / "ema"),
                            "-o", str(slerp), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge-models", "--method", "linear", "--models", str(slerp), "--base", str(start),
                            "--liti", "0.5", "-o", str(liti), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    stages = [str(first / "ema"), str(second / "ema"), str(slerp), str(liti)]
    greedy, sampled, output = scores(first, held, "--reward-function", WORD_REWARD,
                                     *[x for s in stages for x in ("--compare", s)])
    assert set(greedy) == {"base", "fine-tuned", *stages}, output
    start = sampled["base"]["starts_with_word"]
    for stage in stages:
        assert greedy[stage]["starts_with_word"] >= 0.8, output
        if stage != str(liti):
            assert sampled[stage]["starts_with_word"] > start + 0.2, output
    assert start < sampled[str(liti)]["starts_with_word"] < sampled[str(slerp)]["starts_with_word"], output


@pytest.mark.slow
def test_resume_after_sigterm_equals_an_uninterrupted_run(styled, tmp_path):
    """Killed by SIGTERM after step 4 of 8 and resumed: the same prompts in the same order and the same sampled
    completions (generation RNG restored from the checkpoint), so the adapter equals an uninterrupted run's."""
    _, start, prompts, _, _ = styled
    common = ["--model", str(start), *FP32, *LEARN[:4], "--max-steps", "8", "--dataset", prompts,
              "--reward-function", WORD_REWARD, "--set", "training.save_steps=3",
              "--set", "training.per_device_train_batch_size=8"]
    m, ref = resumed_equals_uninterrupted(["rl", *common], tmp_path, "step 4/", 8)
    assert m["rl"]["completions"] == 64  # counted over both attempts
    assert [e["reward"] for e in m["rl"]["reward_history"]][-4:] == [e["reward"] for e in ref["rl"]["reward_history"]][-4:]


@pytest.mark.slow
def test_rl_from_a_lora_sft_run_trains_its_adapter_further(answer_ok_run, prompts, tmp_path):
    """--model runs/x (the session's QLoRA "answer ok" run): its base is loaded, its adapter is the starting policy
    and, frozen, the reference; the saved adapter has the run's shape and moved from the start."""
    from safetensors.torch import load_file

    out = tmp_path / "from-sft"
    r = runner.invoke(app, ["rl", "--model", str(answer_ok_run), "--dataset", str(prompts), "-o", str(out),
                            "--max-steps", "2", "--reward-function", f"{REWARDS}:brevity", "--learning-rate", "1e-2",
                            "--set", "rl.max_completion_length=4", "--set", "data.max_length=64",
                            "--set", "rl.num_generations=4", "--set", "training.per_device_train_batch_size=4",
                            "--set", "training.gradient_accumulation_steps=1", "--set", "training.save_steps=null"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "run.json").read_text())
    assert m["rl"]["initial_adapter"] == str(answer_ok_run)
    assert m["model"]["name_or_path"] == f"builtin:tiny-gemma2 + adapter {answer_ok_run}"
    assert m["rl"]["reference"] == (f"the starting policy: a frozen copy of the adapter of {answer_ok_run} (TRL's "
                                    "`ref` adapter)")
    start, end = (load_file(str(p / "adapter_model.safetensors")) for p in (answer_ok_run, out))
    assert set(start) == set(end)
    assert max((start[k].float() - end[k].float()).abs().max().item() for k in start) > 0


@pytest.mark.slow
def test_a_short_run_on_a_tiny_gemma3(prompts, tmp_path):
    """Gemma 3 text (no final soft-cap: the probe compares against the plain log-softmax) through the same path."""
    out = tmp_path / "gemma3"
    r = runner.invoke(app, ["rl", "--model", "builtin:tiny-gemma3", *FP32, "--dataset", str(prompts), "-o", str(out),
                            "--max-steps", "2", "--reward-function", f"{REWARDS}:brevity"])
    assert r.exit_code == 0, r.output
    assert "equal a plain forward without a final soft-cap (Gemma 3 text has none)" in r.output, r.output
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["model"]["family"] == "gemma3"
    assert m["rl"]["logprob_probe_max_gap_nats"] <= 1e-4 and m["rl"]["completions"] == 8


def test_vllm_generation_is_refused_without_a_gpu(prompts, tmp_path):
    out = tmp_path / "vllm"
    r = rl("--dataset", str(prompts), "-o", str(out), "--reward-function", f"{REWARDS}:brevity",
           "--set", "rl.use_vllm=true")
    assert r.exit_code == 2 and "rl.use_vllm: no CUDA GPU is visible" in r.output, r.output
    assert "leave it false to generate with transformers" in r.output and not out.exists()
