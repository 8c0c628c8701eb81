"""PeftModel behaviour: adapter CRUD, merging, modules_to_save, reports."""

import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterError, MergeError, TargetNotFoundError, UnsupportedArgumentError
from deltatune.layers import AdapterLayer, TrainableCopy
from tests.conftest import model_output, tiny_bert, tiny_gpt2, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}


def _lora(**kw):
    return dt.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw})


def test_print_trainable_parameters_in_peft_format(capsys):
    pm = dt.get_peft_model(tiny_llama(), _lora())
    pm.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)
    # q: 32->32, v: 32->16 (2 kv heads of 8); 2 layers; r=4
    assert pm.get_nb_trainable_parameters()[0] == 2 * 4 * ((32 + 32) + (32 + 16))


def test_default_targets_come_from_the_architecture_table():
    pm = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2))
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, AdapterLayer)]
    assert wrapped and all(n.endswith("c_attn") for n in wrapped)


def test_target_not_found_suggests_close_names():
    with pytest.raises(TargetNotFoundError, match="Did you mean: q_proj") as info:
        dt.get_peft_model(tiny_llama(), _lora(target_modules=["q_prj"]))
    assert "q_proj" in info.value.suggestions


def test_failed_injection_leaves_model_untouched():
    model = tiny_llama()
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TargetNotFoundError):
        dt.get_peft_model(model, _lora(modules_to_save=["clasifier"]))
    assert {n: type(m) for n, m in model.named_modules()} == types


def test_set_adapter_several_trains_all_of_them():
    pm = dt.get_peft_model(tiny_llama(), _lora())
    pm.add_adapter("b", _lora(r=2))
    assert all(not p.requires_grad for n, p in pm.named_parameters() if ".b." in n)
    pm.set_adapter(["default", "b"])
    assert all(p.requires_grad for n, p in pm.named_parameters() if ".b." in n or ".default." in n)
    assert pm.active_adapters == ["default", "b"]


def test_adapter_name_errors():
    pm = dt.get_peft_model(tiny_llama(), _lora())
    with pytest.raises(AdapterError, match="already exists"):
        pm.add_adapter("default", _lora())
    with pytest.raises(AdapterError, match="Adapter .* does not exist"):
        pm.set_adapter("nope")
    with pytest.raises(AdapterError, match="without dots"):
        pm.add_adapter("a.b", _lora())


def test_delete_last_adapter_restores_original_modules():
    model = tiny_llama()
    types = {n: type(m) for n, m in model.named_modules()}
    pm = dt.get_peft_model(model, _lora(modules_to_save=["lm_head"]))
    pm.delete_adapter("default")
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert pm.active_adapters == [] and pm.peft_config == {}


def test_cannot_delete_merged_adapter():
    pm = dt.get_peft_model(tiny_llama(), _lora())
    pm.merge_adapter()
    with pytest.raises(AdapterError, match="merged"):
        pm.delete_adapter("default")


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    pm = dt.get_peft_model(tiny_llama(), _lora(init_lora_weights=False))
    layers = [m for m in pm.modules() if isinstance(m, AdapterLayer)]
    with torch.no_grad():
        layers[-1].lora_B["default"].weight[0, 0] = float("nan")
    before = [m.base_weight.clone() for m in layers]
    with pytest.raises(MergeError, match="non-finite"):
        pm.merge_adapter(safe_merge=True)
    assert all(torch.equal(m.base_weight, b) for m, b in zip(layers, before, strict=True))
    assert not any(m.merged for m in layers)


def test_unload_returns_original_weights_and_modules():
    model = tiny_llama()
    want = model_output(model, IDS)
    pm = dt.get_peft_model(model, _lora(init_lora_weights=False))
    pm.merge_adapter()
    plain = pm.unload()
    assert not any(isinstance(m, (AdapterLayer, TrainableCopy)) for m in plain.modules())
    torch.testing.assert_close(model_output(plain, IDS), want, rtol=1e-5, atol=1e-5)


def test_modules_to_save_trains_a_copy_and_keeps_the_original():
    model = tiny_bert()
    original = model.classifier.weight.detach().clone()
    pm = dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, TrainableCopy)
    assert model.classifier.modules_to_save["default"].weight.requires_grad
    assert not model.classifier.original_module.weight.requires_grad
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    assert torch.equal(model.classifier.original_module.weight, original)
    keys = set(pm.adapter_state_dict("default"))
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    merged = pm.merge_and_unload()
    assert isinstance(merged.classifier, torch.nn.Linear)
    assert torch.equal(merged.classifier.weight, original + 1.0)


def test_bias_modes_choose_trainable_biases():
    pm = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only"))
    trainable_biases = {n for n, p in pm.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable_biases and all("c_attn.base_layer.bias" in n for n in trainable_biases)
    pm_all = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    n_all = sum(1 for n, p in pm_all.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert n_all > len(trainable_biases)


def test_disable_adapter_unmerges_and_reenables():
    base_output = model_output(tiny_llama(), IDS)
    pm = dt.get_peft_model(tiny_llama(), _lora(init_lora_weights=False))
    with_adapter = model_output(pm, IDS)
    pm.merge_adapter()
    with pm.disable_adapter():
        torch.testing.assert_close(model_output(pm, IDS), base_output, rtol=0, atol=0)
    torch.testing.assert_close(model_output(pm, IDS), with_adapter, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_each_layer_back_its_own_state_when_some_were_off():
    base_output = model_output(tiny_llama(), IDS)
    pm = dt.get_peft_model(tiny_llama(), _lora(init_lora_weights=False))
    layers = [m for m in pm.modules() if isinstance(m, AdapterLayer)]
    layers[0].enable_adapters(False)  # one layer off by hand (peft's layer switch), the others on
    before = model_output(pm, IDS)
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    with pm.disable_adapter():
        torch.testing.assert_close(model_output(pm, IDS), base_output, rtol=0, atol=0)
        assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_" in n)
    assert [layer.disabled for layer in layers] == [True] + [False] * (len(layers) - 1)
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == flags
    torch.testing.assert_close(model_output(pm, IDS), before, rtol=0, atol=0)
    pm.disable_adapter_layers()  # all off before the block: all off after it, tensors still frozen
    with pm.disable_adapter():
        pass
    assert all(layer.disabled for layer in layers) and not any(p.requires_grad for p in pm.parameters())


def test_attribute_passthrough_to_base_model():
    pm = dt.get_peft_model(tiny_llama(), _lora())
    assert pm.config.model_type == "llama"
    out = pm.generate(**IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


def test_paths_and_state_dict_keys_are_peft_s_and_the_wrapper_reads_as_a_pretrained_model():
    peft = pytest.importorskip("peft")
    from transformers import PreTrainedModel

    ours = dt.get_peft_model(tiny_llama(), _lora())
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert list(ours.state_dict()) == list(theirs.state_dict())  # base_model.model.model.layers.0...default...
    assert ours.base_model.model is ours.get_base_model()  # peft's tuner level, then the transformers model
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight.shape == (32, 32)
    assert ours.model is ours.get_base_model() and ours.lm_head is ours.get_base_model().lm_head  # as peft reads
    # by type a transformers model; by attribute the wrapped one's (config, embeddings), itself for moving/modes
    assert isinstance(ours, PreTrainedModel) and not isinstance(ours.get_base_model(), dt.PeftModel)
    assert ours.get_input_embeddings() is ours.get_base_model().model.embed_tokens
    assert ours.main_input_name == "input_ids" and ours.config is ours.get_base_model().config
    assert ours.eval() is ours and not ours.training and ours.to(torch.float64) is ours
    # calling `base_model` runs the backbone (transformers' meaning of `PreTrainedModel.base_model`)
    hidden = ours.base_model(**IDS).last_hidden_state
    torch.testing.assert_close(hidden, ours.get_base_model().model(**IDS).last_hidden_state)


def _saved(tmp_path, **kw):
    torch.manual_seed(1)
    dt.get_peft_model(tiny_llama(), _lora(init_lora_weights=False, lora_dropout=0.3, **kw)).save_pretrained(tmp_path)
    return tmp_path


def test_from_pretrained_for_inference_is_in_eval_mode_with_nothing_trainable(tmp_path):
    """Regression: a base left in training mode kept dropout on after loading an adapter for inference."""
    base = tiny_llama().train()
    pm = dt.PeftModel.from_pretrained(base, _saved(tmp_path))
    assert not any(m.training for m in pm.modules())
    assert not any(p.requires_grad for p in pm.parameters())
    torch.testing.assert_close(model_output(pm, IDS), model_output(pm, IDS), rtol=0, atol=0)


def test_from_pretrained_trainable_is_in_training_mode_with_the_adapter_trainable(tmp_path):
    pm = dt.PeftModel.from_pretrained(tiny_llama().eval(), _saved(tmp_path), is_trainable=True)
    assert all(m.training for m in pm.modules())
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def _two_adapters(factory, **kw):
    torch.manual_seed(1)
    pm = dt.get_peft_model(factory(), dt.LoraConfig(r=2, init_lora_weights=False, **kw))
    pm.add_adapter("b", dt.LoraConfig(r=4, init_lora_weights=False, **kw))
    return pm


def test_adapter_names_mix_adapters_row_by_row_like_separate_batches():
    pm = _two_adapters(tiny_llama, target_modules=["q_proj", "v_proj", "embed_tokens"]).eval()
    rows = ["b", "__base__", "default"]
    ids = {"input_ids": torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(2))}
    mixed = pm(**ids, adapter_names=rows).logits
    for i, name in enumerate(rows):
        one = {"input_ids": ids["input_ids"][i : i + 1]}
        if name == "__base__":
            with pm.disable_adapter():
                want = pm(**one).logits
        else:
            pm.set_adapter(name)
            want = pm(**one).logits
        torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-5, atol=1e-5)
    pm.set_adapter("default")
    generated = pm.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=0, adapter_names=rows)
    pm.set_adapter("b")
    alone = pm.generate(**{"input_ids": ids["input_ids"][:1]}, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[0, : alone.shape[1]], alone[0])  # row 0 may stop early (eos), then pads
    assert pm.active_adapters == ["b"]  # the call leaves the active adapters as they were
    with pytest.raises(dt.AdapterError, match="rows"):
        pm(**ids, adapter_names=["b", "default"])
    with pytest.raises(dt.AdapterError, match="nope"):
        pm(**ids, adapter_names=["b", "nope", "default"])
    pm.merge_adapter()
    with pytest.raises(dt.AdapterError, match="unmerge"):
        pm(**ids, adapter_names=rows)


def test_mixed_rows_match_each_adapters_own_forward_and_base_rows_need_no_adapter():
    """Regression (peft's TestMixedAdapterBatches): each group's term is computed as the adapter's own forward
    computes it (a gathered matmul of all groups differed by more rounding and failed peft's allclose on 1.5% of
    random inits here); a batch of "__base__" rows only, or under disable_adapter(), raised 'max() arg is an empty
    sequence'. Base rows are bit-identical; adapter rows to float32 rounding (a matmul over a subset of the rows may
    take other kernels: AVX2 CPUs differ in the last bit)."""
    from tests.conftest import two_linear

    rows = [["__base__", "a", "b"][i % 3] for i in range(9)]
    x = torch.arange(90.0).view(9, 10)
    for seed in range(12):
        model = two_linear()
        torch.manual_seed(seed)
        pm = dt.get_peft_model(model, dt.LoraConfig(target_modules=["lin0"], init_lora_weights=False), "a")
        pm.add_adapter("b", dt.LoraConfig(target_modules=["lin1"], init_lora_weights=False))
        pm.eval()
        with pm.disable_adapter():
            base = pm(x)
            assert torch.equal(pm(x, adapter_names=rows), base)  # disabled wins over the names
        pm.set_adapter("a")
        out_a = pm(x)
        pm.set_adapter("b")
        out_b = pm(x)
        mixed = pm(x, adapter_names=rows)
        assert torch.equal(mixed[::3], base[::3]), seed
        torch.testing.assert_close(mixed[1::3], out_a[1::3], rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(mixed[2::3], out_b[2::3], rtol=1.3e-6, atol=1e-5)
        assert torch.equal(pm(x, adapter_names=["__base__"] * 9), base)


class _WithGru(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.lin0, self.gru = nn.Linear(10, 8), nn.GRU(8, 4, batch_first=batch_first)

    def forward(self, x):
        return self.gru(self.lin0(x))[0]


@pytest.mark.parametrize("batch_first", [False, True])
def test_mixed_batches_refuse_saved_copies_that_cannot_split_rows_in_peft_words(batch_first):
    """A modules_to_save GRU: without batch_first its batch is dimension 1, with it the output is a tuple; both are
    refused with peft's TypeError (and its sentence first), never split along the wrong dimension."""
    torch.manual_seed(0)
    config = dt.LoraConfig(target_modules=["lin0"], modules_to_save=["gru"], init_lora_weights=False)
    pm = dt.get_peft_model(_WithGru(batch_first), config, "a")
    pm.add_adapter("b", config)
    pm.eval()
    x = torch.randn(3, 5, 10) if batch_first else torch.randn(5, 3, 10)
    with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules: Linear, Embed"):
        pm(x, adapter_names=["a", "b", "a"] if batch_first else ["a", "b", "a", "b", "a"])
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): c, d\. "):
        pm(x, adapter_names=["c", "d", "a"])
    pm.merge_adapter(["a"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        pm(x, adapter_names=["a", "b", "a"])


def test_adapter_names_match_peft_with_modules_to_save():
    peft = pytest.importorskip("peft")
    kw = dict(target_modules=["query", "value"], modules_to_save=["classifier"])
    ours = _two_adapters(tiny_bert, **kw).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with torch.no_grad():
            for p in ours.get_base_model().classifier.modules_to_save.parameters():
                p.add_(0.5)
        ours.save_pretrained(folder)
        theirs = peft.PeftModel.from_pretrained(tiny_bert(), folder)
        theirs.load_adapter(f"{folder}/b", "b")
        theirs.eval()
        rows = ["b", "default", "__base__", "b"]
        ids = {"input_ids": torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(4))}
        want = theirs(**ids, adapter_names=rows).logits
        torch.testing.assert_close(ours(**ids, adapter_names=rows).logits, want, rtol=1e-5, atol=1e-5)


def test_subfolder_and_config_are_honoured(tmp_path):
    _saved(tmp_path / "nested")
    pm = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, subfolder="nested")
    want = model_output(pm, IDS)
    other = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "nested", config=_lora(r=4, lora_alpha=2))
    assert other.peft_config["default"].lora_alpha == 2  # the given config, not the saved one (alpha 8)
    layer = next(m for m in other.modules() if isinstance(m, AdapterLayer))
    assert layer.scaling["default"] == 2 / 4
    assert not torch.allclose(model_output(other, IDS), want)
    pm.load_adapter(tmp_path, adapter_name="again", subfolder="nested")
    assert "again" in pm.peft_config


def test_is_main_process_false_writes_nothing(tmp_path):
    pm = dt.get_peft_model(tiny_llama(), _lora())
    pm.save_pretrained(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "call",
    [
        lambda pm, d: pm.save_pretrained(d, safe_serialization=False),
        lambda pm, d: pm.save_pretrained(d, save_embedding_layers="yes"),
        lambda pm, d: pm.save_pretrained(d, max_shard_size="1GB"),
        lambda pm, d: dt.PeftModel.from_pretrained(tiny_llama(), _saved(d), torch_device="meta"),
        lambda pm, d: pm.load_adapter(_saved(d), adapter_name="x", ephemeral_gpu_offload=True),
    ],
)
def test_unsupported_keyword_arguments_are_refused_by_name(call, tmp_path):
    pm = dt.get_peft_model(tiny_llama(), _lora())
    with pytest.raises(
        UnsupportedArgumentError, match=r"safe_serialization|save_embedding|max_shard|torch_device|ephem"
    ):
        call(pm, tmp_path)


def test_an_adapter_loaded_trainable_trains_whether_active_or_not(tmp_path):
    """peft's rule for loaded adapters: `is_trainable` decides, not activation. An adapter added with add_adapter
    trains only while active."""
    source = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    source.save_pretrained(tmp_path)
    model = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # for inference: frozen
    model.load_adapter(tmp_path, adapter_name="more", is_trainable=True)  # not activated

    def trains(name: str) -> bool:
        flags = {p.requires_grad for n, p in model.named_parameters() if f".{name}." in n}
        assert len(flags) == 1, flags
        return flags.pop()

    assert model.active_adapters == ["default"] and not trains("default") and trains("more")
    model.add_adapter("added", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("default")  # recomputed: "more" still trains, "added" (inactive) does not
    assert trains("more") and not trains("added") and not trains("default")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    model.delete_adapter("more")
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_save_embedding_layers_writes_the_tables_peft_writes_and_they_load_back(setting, tmp_path):
    """peft's `save_embedding_layers`: True, or "auto" when target_modules names embed_tokens / lm_head, saves the
    embedding tables (e.g. a vocabulary resized for new tokens) beside the adapter; loading writes them back."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    table = model.get_base_model().model.embed_tokens.base_layer.weight
    with torch.no_grad():
        table.add_(1.0)  # the trained model's table differs from a fresh base's
    if setting == "auto":
        with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True`"):
            model.save_pretrained(tmp_path, save_embedding_layers=setting)
    else:
        model.save_pretrained(tmp_path, save_embedding_layers=setting)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert (key in saved) == (setting is not False)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    got = loaded.get_base_model().model.embed_tokens.base_layer.weight
    assert torch.equal(got, table) == (setting is not False)
    plain = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain", save_embedding_layers=True)  # not targeted, saved when asked
    assert set(load_file(tmp_path / "plain" / "adapter_model.safetensors")) >= {
        "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}  # fmt: skip
    dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")


def test_merge_follows_the_adapters_active_on_each_layer():
    """peft's layer-level activation (`layer.set_adapter([...])`, what code written against peft's layers does):
    merge_adapter() folds in what each layer has active, so the merged model gives the same outputs."""

    def config():  # DoRA: its term depends on what is merged already, so merging a subset would show
        return dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, use_dora=True)

    model = dt.get_peft_model(tiny_llama(), config())
    model.add_adapter("b", config())
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.set_adapter(["default", "b"])
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    both = model_output(model, {"input_ids": ids})
    model.merge_adapter()
    torch.testing.assert_close(model_output(model, {"input_ids": ids}), both, rtol=1e-5, atol=1e-5)
