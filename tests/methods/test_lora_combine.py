"""add_weighted_adapter: exact where the type promises it (rsLoRA, patterns, ranks, negative weights, DoRA through
svd), equal to peft's on plain LoRA, and clear errors elsewhere."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import model_output, perturb_trainable, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}


def _two(config_a, config_b, lib=dt):
    model = lib.get_peft_model(tiny_llama(), config_a)
    model.add_adapter("b", config_b)
    perturb_trainable(model, seed=1)  # the default adapter
    model.set_adapter("b")
    perturb_trainable(model, seed=2)
    return model


def _deltas(model, name):
    return {path: layer.get_delta_weight(name) for path, layer in model.get_base_model().named_modules()
            if name in getattr(layer, "adapter_names", ()) and hasattr(layer, "lora_A")}  # fmt: skip


CASES = {
    "rslora vs plain, different ranks": (dt.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]),
                                         dt.LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "rank and alpha patterns": (dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 3},
                                              alpha_pattern={"q_proj": 7}),
                                dt.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"])),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_exact_types_give_the_weighted_sum_of_the_changes(case, kind):
    model = _two(*CASES[case])
    weights = [0.7, -1.3]  # a negative weight keeps its sign
    model.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=kind, svd_rank=8)
    a, b, mix = _deltas(model, "default"), _deltas(model, "b"), _deltas(model, "mix")
    assert set(mix) == set(a) | set(b)
    for path, got in mix.items():
        want = weights[0] * a.get(path, 0) + weights[1] * b.get(path, 0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_dora_inputs_combine_through_their_effective_change_with_svd(tmp_path):
    model = _two(
        dt.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]), dt.LoraConfig(r=2, target_modules=["q_proj"])
    )
    # DoRA's change W' - W rescales every column: full rank, so the exact combination needs the full rank (32)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_rank=32)
    path = "model.layers.0.self_attn.q_proj"
    want = _deltas(model, "default")[path] + 0.5 * _deltas(model, "b")[path]
    torch.testing.assert_close(_deltas(model, "mix")[path], want, atol=1e-5, rtol=1e-4)
    assert model.peft_config["mix"].use_dora is False
    with pytest.raises(dt.ConfigError, match="uses DoRA.*svd type"):
        model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "bad", combination_type="cat")
    model.set_adapter("mix")
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix")
    torch.testing.assert_close(model_output(loaded, IDS), model_output(model, IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("linear", {}), ("cat", {}), ("svd", {"svd_rank": 3}), ("ties", {"density": 0.5}),
     ("magnitude_prune", {"density": 0.5}), ("ties_svd", {"density": 0.5, "svd_rank": 3}),
     ("magnitude_prune_svd", {"density": 0.7, "svd_rank": 2})],
)  # fmt: skip
def test_equal_to_peft_on_plain_lora(kind, extra):
    import peft

    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    ours, theirs = (
        _two(dt.LoraConfig(**config), dt.LoraConfig(**config)),
        _two(peft.LoraConfig(**config), peft.LoraConfig(**config), lib=peft),
    )
    theirs.load_state_dict(ours.state_dict())  # the same adapter tensors in both  # fmt: skip
    for model in (ours, theirs):
        model.add_weighted_adapter(["default", "b"], [0.6, 0.9], "mix", combination_type=kind, **extra)
        model.set_adapter("mix")
    torch.testing.assert_close(model_output(ours, IDS), model_output(theirs, IDS), atol=1e-4, rtol=1e-4)


def test_errors_name_the_problem():
    model = _two(dt.LoraConfig(r=2, target_modules=["q_proj"]), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="equal rank"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(dt.ConfigError, match="needs density"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="ties")
    with pytest.raises(dt.ConfigError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1], "x")
    with pytest.raises(dt.AdapterError, match="no adapters named"):
        model.add_weighted_adapter(["default", "nope"], [1, 1], "x")
    with pytest.raises(dt.ConfigError, match="combination_type 'mean'"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="mean")
    ia3 = dt.get_peft_model(tiny_llama(), dt.IA3Config())
    with pytest.raises(dt.ConfigError, match="no weighted combination"):
        ia3.add_weighted_adapter(["default"], [1.0], "x")


def test_the_combined_adapter_saves_and_loads_in_peft(tmp_path):
    import peft

    model = _two(*CASES["rslora vs plain, different ranks"])
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    model.set_adapter("mix")
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix")
    torch.testing.assert_close(model_output(theirs, IDS), model_output(model, IDS), atol=1e-5, rtol=1e-5)


def test_merge_command_combines_saved_adapters(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from deltatune.cli.app import app
    from deltatune.pretrained import load_causal_lm

    for seed, name in [(1, "a"), (2, "b")]:
        base, _ = load_causal_lm(tiny_model_dir)
        model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        perturb_trainable(model, seed=seed)
        model.save_pretrained(tmp_path / name)
    args = ["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--adapter",
            str(tmp_path / "b"), "--weights", "0.7,0.3", "--combination", "ties", "--density", "0.5", "--out",
            str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    base, _ = load_causal_lm(tiny_model_dir)
    mixed = dt.PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    mixed.load_adapter(tmp_path / "b", "b")
    mixed.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="ties", density=0.5)
    mixed.set_adapter("mix")
    loaded = dt.PeftModel.from_pretrained(load_causal_lm(tiny_model_dir)[0], tmp_path / "out")
    torch.testing.assert_close(model_output(loaded, IDS), model_output(mixed, IDS), atol=1e-6, rtol=1e-6)
    merged_args = [*args[:-1], str(tmp_path / "merged"), "--merged"]
    assert CliRunner().invoke(app, merged_args).exit_code == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_two_adapters_train_at_once_on_a_mixed_batch_each_from_its_own_rows():
    """Rows of task A go through adapter a and rows of task B through b in one batch: each adapter's gradient equals
    the one from its rows alone, and each has its own optimizer group (its own learning rate)."""
    from deltatune.optimizers import adapter_param_groups

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model)
    model.set_adapter(["default", "b"])  # both train
    ids = torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(4))
    rows = ["default", "b", "b", "default"]

    def grads(batch, names):
        model.zero_grad()
        model(input_ids=batch, adapter_names=names).logits.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mixed = grads(ids, rows)
    alone_a, alone_b = grads(ids[[0, 3]], ["default"] * 2), grads(ids[[1, 2]], ["b"] * 2)
    for name, g in mixed.items():
        want = alone_a[name] if ".default." in name else alone_b[name]
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4)
    groups = adapter_param_groups(model, {"default": 1e-3, "b": 3e-4})
    assert [(g["adapter"], g["lr"], len(g["params"])) for g in groups] == [("default", 1e-3, 8), ("b", 3e-4, 8)]
    optimizer = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads(ids, rows)  # one mixed step trains both
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before and ".lora_B." in n)


def test_a_module_one_adapter_saves_is_the_combinations_and_one_two_save_is_refused_as_in_peft():
    """peft's test_multiple_adapters_*_modules_to_save_merging_adapters*: deltatune refused any modules_to_save."""
    peft = pytest.importorskip("peft")
    from tests.conftest import two_linear

    for lib in (dt, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(two_linear(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"]))
        copies = model.base_model.model.lin1.modules_to_save
        with torch.no_grad():
            copies["default"].weight.add_(1.0)  # the saved copy trained
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "merged", combination_type="linear")
        assert set(copies) == {"default", "merged"}, lib.__name__
        # deltatune: the trained copy of the adapter that saves it (what peft's test comment says; peft 0.21 copies
        # the untrained original, a documented difference)
        want = copies["default"] if lib is dt else model.base_model.model.lin1.original_module
        assert torch.equal(copies["merged"].weight, want.weight) and copies["merged"].weight is not want.weight
        model.set_adapter("merged")
        model(torch.randn(2, 10))

        model.add_adapter("third", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
        with pytest.raises(ValueError, match=r"Cannot add weighted adapters if they target the same module with "
                                             r"modules_to_save, but found 1 such instance\(s\)\."):  # fmt: skip
            model.add_weighted_adapter(["default", "third"], [1.0, 1.0], "again", combination_type="linear")
        assert "again" not in model.peft_config
