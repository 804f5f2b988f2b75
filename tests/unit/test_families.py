"""The family registry: names, published shapes, kernels and the rules validate applies from them (no torch)."""

import json

import pytest
from typer.testing import CliRunner

from gemma2_tune.cli import app
from gemma2_tune.config.layering import resolve
from gemma2_tune.errors import ConfigError
from gemma2_tune.families import (
    FAMILIES,
    GEMMA2,
    GEMMA3,
    GEMMA3_TEXT,
    GEMMA4,
    GEMMA4_UNIFIED,
    Shape,
    family_of_checkpoint,
    family_of_model_type,
    family_of_name,
)

runner = CliRunner()


@pytest.mark.parametrize("name,family", [
    ("google/gemma-2-9b", GEMMA2), ("google/gemma-2-27b-it", GEMMA2), ("unsloth/gemma-2-2b-bnb-4bit", GEMMA2),
    ("builtin:tiny-gemma2", GEMMA2), ("google/gemma-3-1b-it", GEMMA3_TEXT), ("google/gemma-3-270m", GEMMA3_TEXT),
    ("builtin:tiny-gemma3", GEMMA3_TEXT), ("builtin:gemma-3-270m", GEMMA3_TEXT),
    ("google/gemma-3-4b-it", GEMMA3), ("google/gemma-3-27b-pt", GEMMA3), ("unsloth/gemma-3-12b-it-bnb-4bit", GEMMA3),
    ("builtin:tiny-gemma3-vision", GEMMA3), ("google/gemma-4-E2B-it", GEMMA4), ("google/gemma-4-E4B", GEMMA4),
    ("google/gemma-4-26B-A4B-it", GEMMA4), ("google/gemma-4-31B-it", GEMMA4), ("builtin:tiny-gemma4", GEMMA4),
    ("google/gemma-4-12B-it", GEMMA4_UNIFIED),
    ("google/gemma-2b", None),  # Gemma 1
    ("google/gemma-3n-E4B-it", None), ("meta-llama/Llama-3.1-8B", None), ("/models/mine", None),
])
def test_family_of_name(name, family):
    assert family_of_name(name) is family


def test_model_types_and_sizes():
    assert family_of_model_type("gemma2") is GEMMA2 and family_of_model_type("gemma3_text") is GEMMA3_TEXT
    assert family_of_model_type("gemma3") is GEMMA3 and family_of_model_type("llama") is None
    assert family_of_model_type("gemma4") is family_of_model_type("gemma4_text") is GEMMA4
    assert family_of_model_type("gemma4_unified") is GEMMA4_UNIFIED and family_of_model_type("gemma3n") is None
    assert GEMMA3_TEXT.size_from_name("google/gemma-3-270m-it") == "270m"
    assert GEMMA3.size_from_name("google/gemma-3-27b-it") == "27b" and GEMMA4.size_from_name("google/gemma-4-E4B-it") == "e4b"
    assert GEMMA4.size_from_name("google/gemma-4-26B-A4B-it") == "26b-a4b"
    assert GEMMA3_TEXT.size_from_name("google/gemma-3-1b-pt") == "1b"
    assert GEMMA2.size_from_name("google/gemma-2-2b") == "2b"


@pytest.mark.parametrize("family,size,published", [
    (GEMMA3_TEXT, "270m", 268_098_176), (GEMMA3_TEXT, "1b", 999_885_952),  # model cards / safetensors metadata
])
def test_gemma3_parameter_counts_are_exact(family, size, published):
    assert family.shapes[size].total_params == published


def test_every_published_shape_names_its_source_and_its_size_is_recognised():
    for family in FAMILIES:
        for size, shape in family.shapes.items():
            assert shape.source.startswith("https://huggingface.co/google/"), (family.key, size)
            assert family.size_of_shape(shape.hidden, shape.layers) == size


def published_config(family, shape: Shape) -> dict:
    """The config.json of a published multimodal size, from its Shape and the family's tower configurations."""
    from gemma2_tune.families import gemma3, gemma4

    text = dict(model_type=f"{family.model_types[0]}_text", vocab_size=shape.vocab, hidden_size=shape.hidden,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                head_dim=shape.head_dim, intermediate_size=shape.intermediate, sliding_window=shape.sliding_window)
    if family is GEMMA3:
        return dict(model_type="gemma3", text_config=text, vision_config=gemma3._SIGLIP)
    text |= dict(layer_types=list(shape.layer_types), global_head_dim=shape.global_head_dim,
                 num_global_key_value_heads=shape.global_kv_heads or None, attention_k_eq_v=shape.k_eq_v,
                 num_kv_shared_layers=shape.kv_shared_layers, use_double_wide_mlp=shape.double_wide_mlp,
                 hidden_size_per_layer_input=shape.per_layer_dim, vocab_size_per_layer_input=shape.vocab,
                 enable_moe_block=bool(shape.experts), num_experts=shape.experts or None,
                 top_k_experts=shape.experts_per_token or None, moe_intermediate_size=shape.expert_intermediate or None,
                 final_logit_softcapping=30.0)
    if family is GEMMA4_UNIFIED:
        return dict(model_type="gemma4_unified", text_config=text, audio_config=dict(audio_embed_dim=640),
                    vision_config=dict(mm_embed_dim=3840, mm_posemb_size=1120, output_proj_dims=3840))
    small = shape.hidden < 3000 and shape.per_layer_dim  # E2B, E4B: the small image tower and audio
    return dict(model_type="gemma4", text_config=text,
                vision_config=gemma4._SMALL_VISION if small else gemma4._LARGE_VISION,
                audio_config=gemma4._AUDIO if small else None)


MULTIMODAL_SIZES = [(f, size) for f in (GEMMA3, GEMMA4, GEMMA4_UNIFIED) for size in f.shapes]


@pytest.mark.parametrize("family,size", MULTIMODAL_SIZES, ids=lambda x: getattr(x, "key", x))
def test_multimodal_parameter_counts_equal_the_transformers_models(family, size):
    """Every term (heterogeneous Gemma 4 layers, per-layer embeddings, experts, towers) against the model
    transformers builds from the published configuration, on the meta device (no memory, no download)."""
    import torch
    import transformers

    shape = family.shapes[size]
    data = published_config(family, shape)
    config = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    params = dict(model.named_parameters())
    decoder = sum(p.numel() for name, p in params.items() if ".language_model." in name)
    assert shape.total_params == sum(p.numel() for p in params.values())
    assert shape.total_params - shape.tower_params == decoder
    experts = sum(p.numel() for name, p in params.items() if ".experts." in name)
    table = sum(p.numel() for name, p in params.items() if "embed_tokens_per_layer" in name)
    assert (shape.expert_params, shape.per_layer_embedding_params) == (experts, table)
    assert Shape.from_config(config.to_dict()).total_params == shape.total_params  # as saved by transformers
    assert Shape.from_config(data).total_params == shape.total_params  # as published (global_head_dim keys)


@pytest.mark.parametrize("family,size,published", [
    (GEMMA3, "4b", 4_300_079_472), (GEMMA3, "12b", 12_187_325_040), (GEMMA3, "27b", 27_432_406_640),
    # the 31B's safetensors total (model card metadata) holds 2,364 buffers beside its parameters: 60 layer scalars
    # and the image encoder's 2 x 1,152 standardization constants
    (GEMMA4, "31b", 31_273_088_876 - 2_364),
])
def test_multimodal_parameter_counts_equal_the_published_totals(family, size, published):
    assert family.shapes[size].total_params == published


def test_gemma4_facts():
    e2b, e4b, moe, dense = (GEMMA4.shapes[s] for s in ("e2b", "e4b", "26b-a4b", "31b"))
    assert (GEMMA4.attention_softcap, GEMMA4.final_softcap) == (None, 30.0) == (None, GEMMA4_UNIFIED.final_softcap)
    assert all(s.global_head_dim == 512 and s.head_dim == 256 and s.vocab == 262144 for s in GEMMA4.shapes.values())
    assert (e2b.kv_shared_layers, e4b.kv_shared_layers, dense.kv_shared_layers) == (20, 18, 0)
    assert e2b.per_layer_embedding_params == 262144 * 35 * 256 and e4b.per_layer_embedding_params == 262144 * 42 * 256
    assert moe.expert_params == 30 * 128 * 3 * 2816 * 704 and moe.experts_per_token == 8
    assert e2b.layer_types.count("full_attention") == 7 and dense.layer_types.count("full_attention") == 10
    # KV-shared layers have no k/v projections; global layers with keys as values no v_proj
    assert set(e2b.layer_projections(34)) == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert e2b.layer_projections(34)["gate_proj"] == (1536, 2 * 6144)  # double-wide MLP
    assert "v_proj" not in dense.layer_projections(5) and dense.layer_projections(5)["k_proj"] == (5376, 4 * 512)
    assert dense.layer_projections(0)["q_proj"] == (5376, 32 * 256)
    assert GEMMA4.empty_thought_sizes == ("26b-a4b", "31b") and GEMMA4.turn_format == "gemma4"


def test_kernels_keep_each_familys_numerics():
    assert "soft-capping" in GEMMA2.kernel_problem("sdpa")
    assert GEMMA2.kernel_problem("eager") is None and GEMMA3_TEXT.kernel_problem("sdpa") is None
    assert (GEMMA2.attention_softcap, GEMMA2.final_softcap) == (50.0, 30.0)
    assert (GEMMA3_TEXT.attention_softcap, GEMMA3_TEXT.final_softcap) == (None, None)
    # Gemma 4: no attention soft-cap, so sdpa is exact; flash-attn has no kernels for its head_dim 512
    assert GEMMA4.kernel_problem("sdpa") is None and GEMMA3.kernel_problem("sdpa") is None
    assert "head_dim 512" in GEMMA4.kernel_problem("flash_attention_2")
    assert "head_dim 512" in GEMMA4_UNIFIED.kernel_problem("flash_attention_2")
    assert "image tokens" in GEMMA3.kernel_problem("flash_attention_2")


def test_validate_applies_the_family_rules():
    resolve(None, ["model.name_or_path=google/gemma-3-1b-it", "model.attn_implementation=sdpa"])  # allowed
    resolve(None, ["model.name_or_path=builtin:tiny-gemma3", "model.attn_implementation=sdpa"])
    with pytest.raises(ConfigError, match="soft-capping"):
        resolve(None, ["model.name_or_path=google/gemma-2-2b-it", "model.attn_implementation=sdpa"])
    resolve(None, ["model.name_or_path=google/gemma-3-4b-it", "model.attn_implementation=sdpa"])  # image + text
    resolve(None, ["model.name_or_path=google/gemma-4-31B-it", "model.attn_implementation=sdpa"])
    with pytest.raises(ConfigError, match="head_dim 512"):
        resolve(None, ["model.name_or_path=google/gemma-4-E4B-it", "model.attn_implementation=flash_attention_2"])
    r = resolve(None, ["model.name_or_path=myorg/my-tuned-model", "model.attn_implementation=sdpa"])
    assert any("checked when its config loads" in w for w in r.warnings)
    r = resolve(None, ["model.name_or_path=google/gemma-3-1b-it", "model.dtype=float16"])
    assert any("Gemma 3" in w for w in r.warnings)


def test_a_local_checkpoint_is_judged_by_its_config_json(tmp_path):
    def folder(name, config):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        return str(path)

    multimodal = folder("mm", {"model_type": "gemma3", "text_config": {"hidden_size": 5376, "num_hidden_layers": 62}})
    assert family_of_checkpoint(multimodal) is GEMMA3
    with pytest.raises(ConfigError, match="image tokens"):
        resolve(None, [f"model.name_or_path={multimodal}", "model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="Gemma 1"):
        resolve(None, [f"model.name_or_path={folder('g1', {'model_type': 'gemma'})}"])
    shape = {"hidden_size": 4608, "num_hidden_layers": 46}
    big = folder("my-conversion", {"model_type": "gemma2", **shape})  # 27B's shape, a name that doesn't say
    assert family_of_checkpoint(big) is GEMMA2
    with pytest.raises(ConfigError, match="float16 is unstable for Gemma 2 27B"):
        resolve(None, [f"model.name_or_path={big}", "model.dtype=float16"])
    small = folder("g3", {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18})
    resolve(None, [f"model.name_or_path={small}", "model.attn_implementation=sdpa"])


def test_models_command_lists_families_and_builtins():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0
    assert "Gemma 2 (model_type gemma2): 2b (2.61B), 9b (9.24B), 27b (27.23B)" in r.output
    assert "Gemma 3 text (model_type gemma3_text): 270m (0.27B), 1b (1.00B)" in r.output
    assert "builtin:gemma-3-270m" in r.output and "kernels eager, sdpa" in r.output
    assert ("Gemma 4 (model_type gemma4, gemma4_text): e2b (5.10B), e4b (7.94B), 26b-a4b (25.81B), 31b (31.27B); "
            "final soft-cap 30.0; kernels eager, sdpa; towers vision_tower, audio_tower, embed_vision, embed_audio "
            "(frozen)") in r.output
    assert "Gemma 3 (image + text) (model_type gemma3): 4b (4.30B), 12b (12.19B), 27b (27.43B)" in r.output
    assert "builtin:tiny-gemma4" in r.output and "builtin:tiny-gemma3-vision" in r.output


@pytest.mark.parametrize("name,why", [
    ("google/gemma-7b", "Gemma 1"), ("google/gemma-2b-it", "Gemma 1"), ("google/gemma-1.1-7b-it", "Gemma 1"),
    ("google/gemma-3n-E2B-it", "Gemma 3n"), ("google/recurrentgemma-2b", "RecurrentGemma"),
])
def test_names_of_other_architectures_are_refused_before_loading(name, why):
    with pytest.raises(ConfigError, match=why):
        resolve(None, [f"model.name_or_path={name}"])


def test_a_name_that_says_no_family_is_warned_about():
    r = resolve(None, ["model.name_or_path=meta-llama/Llama-3.1-8B"])
    assert any("doesn't name a supported family" in w and "checked when it loads" in w for w in r.warnings)
    assert not resolve(None, ["model.name_or_path=google/gemma-2-2b"]).warnings
