"""Image + text checkpoints on the model side, on the tiny Gemma 3 image + text and Gemma 4 models (built locally):
their own class, towers frozen, unquantized and never adapted, LoRA only in the language model, the checks after
loading (final soft-cap, towers, kernels), KV-shared layers in training equal to the cached forward, packing."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gemma2_tune.config.layering import resolve
from gemma2_tune.data.examples import Example
from gemma2_tune.data.packing import BlockCollator, best_fit_decreasing, pack
from gemma2_tune.data.turns import IGNORE_INDEX
from gemma2_tune.errors import UserError
from gemma2_tune.families import GEMMA3, GEMMA4
from gemma2_tune.models.checks import missing_towers, tower_parameters
from gemma2_tune.models.loading import LoadRequest, load_model, load_tokenizer
from gemma2_tune.models.lora import decoder_prefix, lora_config, lora_modules_outside_decoder, lora_targets

TINY = {"gemma3-vision": ("builtin:tiny-gemma3-vision", GEMMA3, "Gemma3ForConditionalGeneration"),
        "gemma4": ("builtin:tiny-gemma4", GEMMA4, "Gemma4ForConditionalGeneration")}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tune_home):
    from gemma2_tune.models.builtin import builtin_path

    name, family, cls = TINY[request.param]
    return name, builtin_path(name), family, cls


def test_tiny_gemma4_is_shaped_like_the_published_it_models(tune_home):
    from gemma2_tune.models.builtin import builtin_path

    config = json.loads((builtin_path("builtin:tiny-gemma4") / "config.json").read_text())
    text = config["text_config"]
    assert config["architectures"] == ["Gemma4ForConditionalGeneration"] and config["vision_config"]
    assert text["final_logit_softcapping"] == 30.0 and text["hidden_size_per_layer_input"] > 0
    from transformers import AutoConfig

    modes = AutoConfig.from_pretrained(builtin_path("builtin:tiny-gemma4")).text_config.kv_sharing_modes
    kinds = [t for t, mode in zip(text["layer_types"], modes) if mode == "reuse"]
    assert set(kinds) == {"sliding_attention", "full_attention"}  # shared layers reuse both kinds
    assert {p["head_dim"] for p in text["per_layer_config"].values()} == {2 * text["head_dim"]}  # wider global layers


def tiny_run_config(name, *sets):
    return resolve(None, [f"model.name_or_path={name}", "data.dataset=quickstart", "model.dtype=float32", *sets]).config


def trainer_for(name, path, cfg, tmp_path):
    """The trainer sft builds (TRL applies LoRA as lora_config says) on the model loaded as training loads it."""
    from datasets import Dataset

    from gemma2_tune.training.launch import Launch
    from gemma2_tune.training.trainer import build_trainer, trainer_args

    model, report = load_model(LoadRequest.for_run(cfg))
    args = trainer_args(cfg, tmp_path, Launch("single"))
    data = Dataset.from_dict({"input_ids": [[2, 40, 41]], "labels": [[-100, 40, 41]]})
    return build_trainer(cfg, model, AutoTokenizer.from_pretrained(path), data, args, Launch("single")), report


def test_qlora_adapts_only_the_language_model_and_leaves_towers_frozen_and_unquantized(tiny, tmp_path):
    import bitsandbytes as bnb

    from gemma2_tune.models.lora import inspect_adapters

    name, path, family, cls = tiny
    cfg = tiny_run_config(name)
    trainer, report = trainer_for(name, path, cfg, tmp_path)
    model = trainer.model
    base = model.get_base_model()
    assert type(base).__name__ == cls and decoder_prefix(model) == "model.language_model"
    inspect_adapters(model, cfg, report)  # placement checked, as every run does
    adapted = [n for n, m in base.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert adapted and all(n.startswith("model.language_model.layers.") for n in adapted)
    assert lora_modules_outside_decoder(model) == []
    # every adapter weight the run saves is in the language model
    from peft import get_peft_model_state_dict

    keys = list(get_peft_model_state_dict(model))
    assert keys and all(".language_model.layers." in k for k in keys)
    towers = tower_parameters(model, family)
    assert towers and not any(p.requires_grad for _, p in towers)
    tower_modules = [m for n, m in base.named_modules() if n.startswith(family.towers)]
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in tower_modules)  # towers unquantized
    assert isinstance(base.model.language_model.layers[0].self_attn.q_proj, torch.nn.Module)
    assert isinstance(base.model.language_model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    # the optimizer holds exactly the trainable weights: LoRA's, none of a tower
    trainer.create_optimizer()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert not in_optimizer & {id(p) for _, p in towers}


def test_leaf_names_alone_would_reach_the_towers(tiny):
    """Why the targets are a regex on these models: the towers have q/k/v projections of their own (Gemma 4's are
    Gemma4ClippableLinear, which PEFT cannot wrap)."""
    name, path, family, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert any(n.startswith(family.towers) and n.rsplit(".", 1)[-1] in names for n, _ in model.named_modules())
    target = lora_targets(model, names)
    assert isinstance(target, str) and target.startswith(r"model\.language_model\.layers")
    from peft import get_peft_model

    if family is GEMMA3:  # plain leaf names put LoRA into the SigLIP tower
        wrapped = get_peft_model(model, lora_config(tiny_run_config(name)))
        assert any(n.startswith(family.towers) for n in lora_modules_outside_decoder(wrapped))
    else:
        with pytest.raises(ValueError, match="Gemma4ClippableLinear"):
            get_peft_model(model, lora_config(tiny_run_config(name)))


def test_full_fine_tuning_leaves_the_towers_out_of_the_optimizer(tiny, tmp_path):
    name, path, family, _ = tiny
    cfg = tiny_run_config(name, "quantization.load_in_4bit=false", "lora.enabled=false")
    trainer, _ = trainer_for(name, path, cfg, tmp_path)
    trainer.create_optimizer()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    towers = {id(p) for _, p in tower_parameters(trainer.model, family)}
    decoder = {id(p) for n, p in trainer.model.named_parameters() if ".language_model." in n}
    assert towers and not in_optimizer & towers and decoder <= in_optimizer


def test_a_config_without_the_final_soft_cap_is_refused(tune_home, tmp_path):
    """Gemma4TextConfig defaults final_logit_softcapping to None: a config.json written without it would train
    and answer with uncapped logits. Every published Gemma 4 config sets 30.0."""
    from gemma2_tune.models.builtin import builtin_path

    folder = tmp_path / "no-cap"
    shutil.copytree(builtin_path("builtin:tiny-gemma4"), folder)
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]["final_logit_softcapping"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no final_logit_softcapping.*30.0.*text_config"):
        load_model(LoadRequest(str(folder), dtype="float32"))
    model, report = load_model(LoadRequest("builtin:tiny-gemma4", dtype="float32"))
    assert (report.attention_softcap, report.final_softcap) == (None, 30.0)
    ids = torch.randint(20, 900, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the cap is active: sharpen the logits, none may exceed 30
        model.lm_head.weight.mul_(1000.0)
        assert model(input_ids=ids).logits.abs().max().item() <= 30.0


def test_a_class_that_drops_the_towers_is_refused(tune_home):
    from types import SimpleNamespace

    config = SimpleNamespace(vision_config={"hidden_size": 8}, audio_config=None)
    decoder_only = SimpleNamespace(config=config, named_parameters=lambda: iter(
        [("model.language_model.layers.0.self_attn.q_proj.weight", None)]))
    assert missing_towers(decoder_only, GEMMA3) == ["vision tower"]
    whole = SimpleNamespace(config=config, named_parameters=lambda: iter(
        [("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", None)]))
    assert missing_towers(whole, GEMMA3) == []


def test_flash_attention_is_refused_for_gemma4_before_loading(tune_home):
    with pytest.raises(UserError, match="head_dim 512"):
        load_model(LoadRequest("builtin:tiny-gemma4", attn_implementation="flash_attention_2"))


def test_a_tokenizer_must_hold_its_familys_turn_markers_as_single_tokens(tune_home):
    """Gemma 4's tokenizer is checked for <|turn>/<turn|>, Gemma 2/3's for <start_of_turn>/<end_of_turn>: a Gemma 2
    tokenizer given as a Gemma 4's is refused, naming the marker it splits."""
    from gemma2_tune.families import GEMMA4
    from gemma2_tune.models.builtin import builtin_path

    assert load_tokenizer("builtin:tiny-gemma4").convert_tokens_to_ids("<turn|>") == 106
    load_tokenizer("builtin:tiny-gemma3-vision")  # Gemma 3's image + text models use Gemma 3's turns
    with pytest.raises(UserError, match=r"splits <\|turn>"):
        load_tokenizer(str(builtin_path("builtin:tiny-gemma2")), family=GEMMA4)


def test_kv_shared_training_forward_equals_the_cached_forward(tune_home):
    """E2B/E4B reuse earlier layers' keys and values in their last layers; the training forward (no cache,
    gradient checkpointing) must compute what the cached forward and token-by-token decoding compute, in fp32."""
    from gemma2_tune.models.builtin import builtin_path

    model = AutoModelForCausalLM.from_pretrained(builtin_path("builtin:tiny-gemma4"), dtype=torch.float32)
    assert "reuse" in model.config.text_config.kv_sharing_modes
    ids = torch.randint(20, 900, (2, 70), generator=torch.Generator().manual_seed(0))  # longer than the window
    model.eval()
    with torch.no_grad():
        cached = model(input_ids=ids, use_cache=True).logits
        out = model(input_ids=ids[:, :40], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(40, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    model.train()  # no dropout in Gemma 4: training mode changes nothing but checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = model(input_ids=ids, use_cache=False, labels=ids)
    assert (trained.logits - cached).abs().max().item() <= 1e-5
    assert (torch.cat(steps, 1) - cached).abs().max().item() <= 1e-4
    trained.loss.backward()
    checkpointed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_disable()
    model(input_ids=ids, use_cache=False, labels=ids).loss.backward()
    # the producers of the shared keys and values get their gradient through the shared layers too
    producer = "model.language_model.layers.3.self_attn.k_proj.weight"
    assert producer in checkpointed
    assert max((checkpointed[n] - p.grad).abs().max().item() for n, p in model.named_parameters()
               if p.grad is not None) <= 1e-6


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_packed_rows_equal_rows_alone(tiny, kernel):
    """Packing (the default) on the image + text classes: each row of a block sees only itself (position ids
    restart, no 2-D mask), under eager and sdpa, fp32; rows longer than the sliding window."""
    _, path, _, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=kernel, dtype=torch.float32).eval()
    text = model.config.get_text_config()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in [3 * text.sliding_window, 2 * text.sliding_window + 5, text.sliding_window + 1, 9, 40, 70, 1]:
        ids = [2] + torch.randint(30, text.vocab_size, (n - 1,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    batch = BlockCollator(pad_token_id=0)([vars(b) for b in pack(examples, capacity=128)])
    worst = 0.0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for b, members in enumerate(best_fit_decreasing([len(e.input_ids) for e in examples], 128)):
            start = 0
            for i in sorted(members):
                n = len(examples[i].input_ids)
                alone = model(input_ids=torch.tensor([examples[i].input_ids]), use_cache=False).logits[0]
                worst = max(worst, (packed[b, start:start + n] - alone).abs().max().item())
                start += n
        leaked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
    assert worst <= 1e-4, worst
    assert (leaked - packed).abs().max().item() > 1e-3  # negative control: a 2-D all-ones mask lets rows mix


@pytest.mark.slow  # a minute of torch.compile on 2 CPU cores
def test_flex_attention_equals_eager_on_gemma3_image_text(tune_home):
    """flex_attention is allowed for Gemma 3's image + text models: packed rows, fp32, forward on this CPU (it has no
    CPU backward; training with it is CUDA's). Gemma 4 refuses it (families/gemma4.py says why)."""
    from gemma2_tune.models.builtin import builtin_path

    path = builtin_path("builtin:tiny-gemma3-vision")
    eager, flex = (AutoModelForCausalLM.from_pretrained(path, attn_implementation=k, dtype=torch.float32).eval()
                   for k in ("eager", "flex_attention"))
    text = eager.config.get_text_config()
    g = torch.Generator().manual_seed(1)
    examples = [Example(ids, [IGNORE_INDEX] + ids[1:]) for ids in
                ([2] + torch.randint(30, text.vocab_size, (n - 1,), generator=g).tolist()
                 for n in [3 * text.sliding_window, 2 * text.sliding_window + 5, 9, 40])]
    batch = BlockCollator(pad_token_id=0)([vars(b) for b in pack(examples, capacity=128)])
    with torch.no_grad():
        a, b = (m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
                for m in (eager, flex))
    assert flex.config._attn_implementation == "flex_attention" and (a - b).abs().max().item() <= 1e-5


def test_gemma4_merge_keeps_its_class_and_towers(tune_home, tmp_path):
    """What `merge` does to a run (LoRA folded in with PEFT, the folder saved, reloaded as a server would) on the tiny
    Gemma 4: the checkpoint's class, the towers' tensors byte-equal to the base's, the adapter in the decoder. (The
    command itself refuses Gemma 4 until its turn format is rendered: its self-check renders chats.)"""
    from peft import get_peft_model
    from safetensors.torch import load_file

    from gemma2_tune.models.builtin import builtin_path

    base_dir = builtin_path("builtin:tiny-gemma4")
    model, _ = load_model(LoadRequest("builtin:tiny-gemma4", dtype="float32"))
    wrapped = get_peft_model(model, lora_config(tiny_run_config("builtin:tiny-gemma4"), model))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    wrapped.merge_and_unload().save_pretrained(tmp_path / "merged")
    base, merged = load_file(str(base_dir / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    towers = [k for k in base if k.startswith(("model.vision_tower.", "model.embed_vision."))]
    assert towers and all(torch.equal(base[k], merged[k]) for k in towers) and base.keys() == merged.keys()
    assert not torch.equal(base["model.language_model.layers.0.self_attn.q_proj.weight"],
                           merged["model.language_model.layers.0.self_attn.q_proj.weight"])
    reloaded, report = load_model(LoadRequest(str(tmp_path / "merged"), dtype="float32"))
    assert type(reloaded).__name__ == "Gemma4ForConditionalGeneration" and report.final_softcap == 30.0
