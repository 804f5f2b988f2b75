from types import SimpleNamespace

import pytest
import torch

from gemma2_tune.config.sft import SftConfig
from gemma2_tune.errors import ConfigError, UserError
from gemma2_tune.families import GEMMA2
from gemma2_tune.models.checks import check_loaded
from gemma2_tune.models.loading import LoadRequest, check_tokenizer, load_model
from gemma2_tune.models.lora import lora_config
from gemma2_tune.models.quantization import run_bnb_config
from gemma2_tune.config.layering import resolve


def tiny_cfg(*sets):
    return resolve(None, ["model.name_or_path=builtin:tiny-gemma2", "data.dataset=quickstart", *sets]).config


def test_bnb_config_is_nf4_double_quant_bf16_storage():
    q = run_bnb_config(SftConfig())
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_quant_storage == torch.bfloat16
    assert run_bnb_config(resolve(None, ["quantization.load_in_4bit=false", "lora.enabled=false"]).config) is None


def test_lora_config_targets_exactly_qkvo():
    lc = lora_config(SftConfig())
    assert set(lc.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (16, 32, 0.05)


@pytest.fixture(scope="module")
def qlora_model(tiny_model_dir, tmp_path_factory):
    """The model as training sees it: loaded in 4-bit, then wrapped with LoRA by the trainer."""
    from datasets import Dataset

    from gemma2_tune.training.launch import Launch
    from gemma2_tune.models.loading import load_tokenizer
    from gemma2_tune.models.lora import inspect_adapters
    from gemma2_tune.training.trainer import build_trainer, trainer_args

    cfg = tiny_cfg()
    model, report = load_model(LoadRequest.for_run(cfg))
    args = trainer_args(cfg, tmp_path_factory.mktemp("trainer"), Launch("single"))
    data = Dataset.from_dict({"input_ids": [[2, 5, 6]], "labels": [[-100, 5, 6]]})
    trainer = build_trainer(cfg, model, load_tokenizer(str(tiny_model_dir)), data, args, Launch("single"))
    inspect_adapters(trainer.model, cfg, report)
    return trainer.model, report


def test_qlora_load_is_4bit_eager_with_lora_on_attention_only(qlora_model):
    import bitsandbytes as bnb

    model, report = qlora_model
    base = model.get_base_model()
    attn = base.model.layers[0].self_attn
    assert isinstance(attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert attn.q_proj.base_layer.weight.quant_type == "nf4"
    assert report.attn_implementation == "eager" == base.config._attn_implementation
    assert (report.attention_softcap, report.final_softcap) == (50.0, 30.0)
    assert report.layer_types == ["sliding_attention", "full_attention"] * 2
    assert report.lora_targets == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert report.lora_modules == 4 * report.num_layers
    mlp = base.model.layers[0].mlp
    assert not hasattr(mlp.gate_proj, "lora_A") and isinstance(mlp.gate_proj, bnb.nn.Linear4bit)
    expected = sum(16 * (m.in_features + m.out_features)
                   for layer in base.model.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                             layer.self_attn.v_proj, layer.self_attn.o_proj))
    assert report.trainable_params == expected
    assert base.config.use_cache is False


def test_final_soft_cap_is_active_in_the_loaded_model(qlora_model):
    model, _ = qlora_model
    base = model.get_base_model()
    emb = base.get_output_embeddings().weight
    saved = emb.data.clone()
    try:
        emb.data *= 1000.0  # raw logits in the thousands
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[2, 10, 11, 12]])).logits
        assert 29.0 < logits.abs().max().item() <= 30.0
    finally:
        emb.data.copy_(saved)


def test_non_gemma2_checkpoint_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="'llama' model; gemma2-tune trains Gemma 2 .* Gemma 3 text"):
        load_model(LoadRequest(str(tmp_path)))
    with pytest.raises(ConfigError, match="'llama' model"):  # found by validate too, from config.json
        resolve(None, [f"model.name_or_path={tmp_path}"])


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="nope: no such folder"):
        load_model(LoadRequest(str(tmp_path / "nope")))
    adapter = tmp_path / "a-lora-run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="is a LoRA adapter .* merge it first"):
        load_model(LoadRequest(str(adapter)))
    with pytest.raises(ConfigError, match="is a LoRA adapter"):  # validate says so too
        resolve(None, [f"model.name_or_path={adapter}"])
    with pytest.raises(ConfigError, match="model.name_or_path: empty"):
        resolve(None, ["model.name_or_path=''"])


def test_flash_attention_without_flash_attn_is_refused(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version

    def fake(name):
        if name == "flash-attn":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", fake)
    with pytest.raises(UserError, match="flash-attn is not installed"):
        load_model(LoadRequest.for_run(tiny_cfg("model.attn_implementation=flash_attention_2")))
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "2.5.9" if n == "flash-attn" else real(n))
    with pytest.raises(UserError, match="no softcap support"):
        load_model(LoadRequest.for_run(tiny_cfg("model.attn_implementation=flash_attention_2")))


def fake_model(**config):
    base = dict(_attn_implementation="eager", attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                hidden_size=3584, num_hidden_layers=42)
    return SimpleNamespace(config=SimpleNamespace(**(base | config)))


def test_post_load_checks():
    assert check_loaded(fake_model(), GEMMA2, "eager", "bfloat16") == []
    with pytest.raises(UserError, match="runs sdpa"):
        check_loaded(fake_model(_attn_implementation="sdpa"), GEMMA2, "eager", "bfloat16")
    assert "disabled" in check_loaded(fake_model(attn_logit_softcapping=None), GEMMA2, "eager", "bfloat16")[0]
    with pytest.raises(UserError, match="27B"):
        check_loaded(fake_model(hidden_size=4608, num_hidden_layers=46), GEMMA2, "eager", "float16")


def test_a_tokenizer_without_gemma_turn_tokens_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<bos>": 1, "<": 2, ">": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
    with pytest.raises(UserError, match="not a Gemma tokenizer"):
        check_tokenizer(fast, "some/model")


def test_an_evaluation_does_not_break_4bit_gradients(qlora_model):
    """bitsandbytes' CPU inference repacking (on eval-mode forwards) has no backward; it must not happen."""
    model, _ = qlora_model
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])

    def input_grad():
        model.train()
        emb = model.get_base_model().model.embed_tokens(ids).detach().requires_grad_()
        out = model(inputs_embeds=emb, use_cache=False).logits.float().sum()
        (grad,) = torch.autograd.grad(out, emb)
        return grad

    before = input_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # what an evaluation during training does
    after = input_grad()
    packed = [m for m in model.modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                                                     "packing_format_for_cpu", False)]
    assert packed == []
    assert torch.allclose(before, after, atol=1e-6)
