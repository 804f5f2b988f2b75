import pytest

from gemma2_tune.config.sft import SftConfig
from gemma2_tune.families import GEMMA2
from gemma2_tune.errors import ConfigError
from gemma2_tune.config.layering import parse_set, resolve


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_follow_the_gemma2_qlora_reference():
    cfg = SftConfig()
    assert cfg.model.attn_implementation == "eager"
    assert cfg.model.dtype == "bfloat16"
    q = cfg.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant) == (True, "nf4", True)
    assert cfg.compute_dtype == "bfloat16" and cfg.quant_storage == "bfloat16"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    t = cfg.training
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (2e-4, 1, 4)
    assert t.gradient_checkpointing is True
    assert cfg.data.max_length == 1024
    assert cfg.data.system_policy == "fold"


def test_precedence_defaults_recipe_set_flags(tmp_path):
    recipe = write(tmp_path, "training:\n  learning_rate: 1.0e-3\n  max_steps: 7\ndata:\n  max_length: 512\n")
    r = resolve(recipe)
    assert r.config.training.learning_rate == 1e-3 and r.config.data.max_length == 512
    assert r.config.lora.r == 16  # default kept
    r = resolve(recipe, ["training.learning_rate=5e-5", "data.max_length=256"])
    assert r.config.training.learning_rate == 5e-5 and r.config.data.max_length == 256
    r = resolve(recipe, ["training.learning_rate=5e-5"], {"training.learning_rate": ("--learning-rate", 3e-6),
                                                         "training.max_steps": ("--max-steps", None)})
    assert r.config.training.learning_rate == 3e-6
    assert r.config.training.max_steps == 7  # a flag that was not given changes nothing


def test_set_values_are_typed():
    assert parse_set("training.max_steps=10") == ("training.max_steps", 10)
    assert parse_set("lora.target_modules=[q_proj, v_proj]") == ("lora.target_modules", ["q_proj", "v_proj"])
    assert parse_set("training.gradient_checkpointing=false") == ("training.gradient_checkpointing", False)
    cfg = resolve(None, ["training.learning_rate=1e-4"]).config
    assert cfg.training.learning_rate == pytest.approx(1e-4)


def test_all_problems_reported_together_with_keys(tmp_path):
    recipe = write(tmp_path, "lora:\n  rr: 8\n  dropout: 2\ntraining:\n  learning_rate: fast\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        resolve(recipe, ["data.max_length=-3"])
    text = "\n".join(err.value.problems)
    assert "lora.rr" in text and "unknown key" in text and "did you mean 'r'" in text
    assert "lora.dropout" in text
    assert "training.learning_rate" in text
    assert "bogus: unknown key" in text or "bogus" in text
    assert "data.max_length (--set data.max_length=-3)" in text
    assert len(err.value.problems) == 5
    assert f"recipe {recipe}" in text  # each problem names where its value came from


def test_sdpa_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as err:
        resolve(None, ["model.attn_implementation=sdpa"])
    assert "soft-capping" in err.value.problems[0] and "model.attn_implementation" in err.value.problems[0]


def test_fp16_refused_for_27b_warned_elsewhere():
    with pytest.raises(ConfigError) as err:
        resolve(None, ["model.name_or_path=google/gemma-2-27b-it", "model.dtype=float16"])
    assert "27B" in err.value.problems[0]
    r = resolve(None, ["model.name_or_path=google/gemma-2-9b", "model.dtype=float16"])
    assert any("float16" in w for w in r.warnings)


def test_contradictions_are_errors():
    with pytest.raises(ConfigError) as err:
        resolve(None, ["lora.enabled=false"])  # 4-bit weights with nothing trainable
    assert "load_in_4bit" in err.value.problems[0]
    with pytest.raises(ConfigError):
        resolve(None, ["quantization.load_in_4bit=false", "quantization.quant_storage=bfloat16", "lora.enabled=false"])
    with pytest.raises(ConfigError):
        resolve(None, ["lora.target_modules=[]"])
    r = resolve(None, ["lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj]"])
    assert any("MLP" in w for w in r.warnings)


def test_bad_set_syntax_and_non_sections():
    with pytest.raises(ConfigError) as err:
        resolve(None, ["training.learning_rate", "model=3", "model.name_or_path.x=1"])
    text = "\n".join(err.value.problems)
    assert "expected dotted.key=value" in text
    assert "model.name_or_path.x" in text


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve(str(tmp_path / "missing.yaml"))
    assert "no such recipe" in err.value.problems[0]
    bad = write(tmp_path, "model:\n  name_or_path: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        resolve(bad)
    assert "invalid YAML" in err.value.problems[0] and "line" in err.value.problems[0]
    with pytest.raises(ConfigError) as err:
        resolve(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "mapping" in err.value.problems[0]


def test_model_size_from_name():
    assert GEMMA2.size_from_name("google/gemma-2-27b-it") == "27b"
    assert GEMMA2.size_from_name("google/gemma-2-9b") == "9b"
    assert GEMMA2.size_from_name("google/gemma-2-2b-it") == "2b"
    assert GEMMA2.size_from_name("/models/my-gemma") is None


def test_lora_targets_are_checked_against_the_family_without_loading():
    with pytest.raises(ConfigError) as err:
        resolve(None, ["lora.target_modules=[q_prj, k_proj, v_proj, o_proj]"])
    assert "'q_prj' is not a module of Gemma 2" in err.value.problems[0] and "did you mean 'q_proj'?" in err.value.problems[0]
    for tied in ("lm_head", "embed_tokens"):
        with pytest.raises(ConfigError) as err:
            resolve(None, [f"lora.target_modules=[q_proj, v_proj, {tied}]"])
        assert len(err.value.problems) == 1 and "ties lm_head to embed_tokens" in err.value.problems[0]
    resolve(None, ["lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"])


def test_schema_errors_and_rule_errors_are_reported_together(tmp_path):
    recipe = write(tmp_path, "model:\n  name_or_path: google/gemma-2-9b\n  attn_implementation: sdpa\nfoo: 1\n"
                             "lora:\n  r: many\n  target_modules: [q_prj]\n")
    with pytest.raises(ConfigError) as err:
        resolve(recipe)
    text = "\n".join(err.value.problems)
    assert "foo" in text and "unknown key" in text and "lora.r" in text  # schema
    assert "soft-capping" in text and "'q_prj' is not a module" in text  # rules, despite the schema errors


def test_distill_rules_name_the_right_keys(tmp_path):
    from gemma2_tune.config.distill import DistillConfig

    with pytest.raises(ConfigError) as err:
        resolve(None, ["distill.max_completion_length=2000", "data.max_length=1024"], schema=DistillConfig)
    assert "distill.max_completion_length (2000) leaves no room for a prompt in data.max_length (1024)" in (
        err.value.problems[0])
    with pytest.raises(ConfigError) as err:
        resolve("gemma-2-9b-distill-from-27b", ["model.dtype=float16"], schema=DistillConfig)
    text = "\n".join(err.value.problems)
    assert "model.dtype (the teacher): float16 is unstable for Gemma 2 27B" in text and "teacher.dtype" not in text
    with pytest.raises(ConfigError, match="teacher.name_or_path: /no/such/teacher: no such folder"):
        resolve(None, ["teacher.name_or_path=/no/such/teacher"], schema=DistillConfig)
    # sft's keys are unknown keys for distill (its schema has no key it ignores), said with whose they are
    with pytest.raises(ConfigError, match="data.packing .*: unknown key for method distill .a key of sft"):
        resolve(None, ["data.packing=false"], schema=DistillConfig)
    r = resolve(None, [], schema=DistillConfig)
    assert r.config.output.dir == "runs/gemma2-distill" and r.config.method == "distill"
