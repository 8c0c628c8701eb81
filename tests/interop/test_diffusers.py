"""LoRA on diffusion models, with diffusers as the oracle: a UNet and an SD3-style transformer adapted by deltatune,
files in diffusers' and kohya's layouts read and written, several LoRA files mixed with weights (diffusers'
`set_adapters`), the merged mix, and a few-image noise-prediction training loop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import deltatune as dt
from deltatune.diffusion import load_lora_file, save_diffusers_lora, train_noise_prediction
from deltatune.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=8, pooled_projection_dim=6, out_channels=4,
        pos_embed_max_size=8,
    ).eval()  # fmt: skip


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])), {
        "encoder_hidden_states": torch.randn(2, 5, 12, generator=g)
    }


def _sd3_inputs():
    g = torch.Generator().manual_seed(1)
    return (), {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
        "pooled_projections": torch.randn(2, 6, generator=g),
        "timestep": torch.tensor([10, 500]),
    }


def _out(model, inputs):
    args, kwargs = inputs
    with torch.no_grad():
        return model(*args, **kwargs).sample


def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _ours(targets=ATTENTION, seed=3, **kwargs):
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs)
    return _perturbed(dt.get_peft_model(tiny_unet(), config), seed).eval()


@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_lora_on_diffusion_models_equals_peft_on_the_same_tensors(family):
    """deltatune's LoRA on a UNet (attention and LoCon-style conv layers) and on an SD3 transformer gives peft's
    outputs for the same tensors (diffusers' own `add_adapter` is peft)."""
    make, inputs = (tiny_unet, _unet_inputs) if family == "unet" else (tiny_sd3, _sd3_inputs)
    targets = [*ATTENTION, "conv1", "conv2"] if family == "unet" else [*ATTENTION, "add_k_proj", "add_v_proj"]
    ours = _perturbed(dt.get_peft_model(make(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets)), 3)
    theirs = make()
    theirs.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    from peft.utils import set_peft_model_state_dict

    state = {k.removeprefix("base_model.model."): v for k, v in ours.adapter_state_dict("default").items()}
    assert not set_peft_model_state_dict(theirs, state).unexpected_keys
    want = _out(theirs, inputs())
    assert (want - _out(make(), inputs())).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(_out(ours.eval(), inputs()), want, rtol=1e-5, atol=1e-5)


def test_our_file_loads_in_diffusers_with_equal_outputs(tmp_path):
    ours = _ours([*ATTENTION, "conv1"])
    path = save_diffusers_lora(ours, tmp_path, prefix="unet")
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())  # noqa: SIM118
        fields = json.loads(f.metadata()["lora_adapter_metadata"])
    assert fields["unet.r"] == 4 and fields["unet.lora_alpha"] == 8
    # the pipeline's reader takes it as it is
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path))
    assert alphas is None and set(state) == {
        f"unet.{k[len('base_model.model.') :]}" for k in ours.adapter_state_dict("default")
    }
    unet = tiny_unet()
    # the file's name said, as pipe.load_lora_weights says it: diffusers reads the header's config only then
    unet.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="ours")
    torch.testing.assert_close(_out(unet, _unet_inputs()), _out(ours, _unet_inputs()), rtol=1e-5, atol=1e-5)


def test_an_sd3_transformer_lora_round_trips_through_diffusers_transformer_prefix(tmp_path):
    targets = [*ATTENTION, "add_k_proj", "add_v_proj"]
    ours = _perturbed(dt.get_peft_model(tiny_sd3(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets)), 4)
    path = save_diffusers_lora(ours, tmp_path, prefix="transformer")
    theirs = tiny_sd3()
    theirs.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer", adapter_name="x")
    want = _out(theirs, _sd3_inputs())
    torch.testing.assert_close(_out(ours.eval(), _sd3_inputs()), want, rtol=1e-5, atol=1e-5)
    back = load_lora_file(tiny_sd3(), path, adapter_name="x", prefix="transformer")
    torch.testing.assert_close(_out(back, _sd3_inputs()), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["pipeline", "model"])
def test_a_diffusers_file_loads_here_with_equal_outputs(tmp_path, layout):
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=[*ATTENTION, "conv2"], init_lora_weights="gaussian")
    unet.add_adapter(config, adapter_name="style")
    _perturbed(unet, 5)
    if layout == "pipeline":
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="style"),
            unet_lora_adapter_metadata=config.to_dict(),
        )  # fmt: skip
    else:
        unet.save_lora_adapter(tmp_path, adapter_name="style")
    loaded = load_lora_file(tiny_unet(), tmp_path, adapter_name="style")
    assert loaded.peft_config["style"].lora_alpha == 6
    torch.testing.assert_close(_out(loaded, _unet_inputs()), _out(unet, _unet_inputs()), rtol=1e-5, atol=1e-5)


def _kohya_file(path, every_alpha: bool = True):
    """A kohya / A1111 file for the tiny UNet: attention modules at rank 4 with alpha 2, one conv at rank 2 with
    alpha 1, text-encoder keys beside; without `every_alpha`, the to_out.0 modules have no alpha."""
    g = torch.Generator().manual_seed(7)
    unet = tiny_unet()
    modules = {n: m for n, m in unet.named_modules()}
    tensors = {}
    chosen = [n for n in modules if n.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0"))]
    chosen.append("down_blocks.1.resnets.0.conv1")
    for name in chosen:
        base = modules[name]
        stem = "lora_unet_" + name.replace(".", "_")
        if isinstance(base, torch.nn.Conv2d):
            r = 2
            down = torch.randn(r, base.in_channels, *base.kernel_size, generator=g) * 0.3
            up = torch.randn(base.out_channels, r, 1, 1, generator=g) * 0.3
            tensors[f"{stem}.alpha"] = torch.tensor(1.0)
        else:
            r = 4
            down = torch.randn(r, base.in_features, generator=g) * 0.3
            up = torch.randn(base.out_features, r, generator=g) * 0.3
            if every_alpha or not name.endswith("to_out.0"):
                tensors[f"{stem}.alpha"] = torch.tensor(2.0)
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(4, 12)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(12, 4)
    save_file(tensors, str(path))
    return tensors, chosen


def test_a_kohya_file_applies_alpha_over_rank_per_module(tmp_path):
    path = tmp_path / "style.safetensors"
    tensors, chosen = _kohya_file(path)
    with pytest.warns(UserWarning, match=r"kohya components \['te'\]"):  # the text encoder's keys: not a UNet's
        ours = load_lora_file(tiny_unet(), path, adapter_name="kohya")
    # one linear module by hand: base + (alpha / r) * up(down(x))
    name = next(n for n in chosen if n.endswith("attn1.to_q"))
    layer = ours.get_base_model().get_submodule(name)
    stem = "lora_unet_" + name.replace(".", "_")
    x = torch.randn(3, layer.base_layer.in_features)
    down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + 0.5 * x @ down.T @ up.T, rtol=1e-5, atol=1e-5)
    # and the whole UNet as diffusers reads the same file (its kohya conversion, then peft)
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    unet = tiny_unet()
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    unet_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")}
    diffusers.StableDiffusionPipeline.load_lora_into_unet(unet_state, unet_alphas, unet, adapter_name="kohya")
    torch.testing.assert_close(_out(ours, _unet_inputs()), _out(unet, _unet_inputs()), rtol=1e-5, atol=1e-5)


def test_a_kohya_module_without_alpha_has_scale_one(tmp_path):
    """kohya's and A1111's reading (alpha = rank when the file has none); diffusers gives such a module the file's
    most common alpha instead (here 2 / 4), so this case is checked by hand, not against diffusers."""
    path = tmp_path / "style.safetensors"
    tensors, chosen = _kohya_file(path, every_alpha=False)
    ours = load_lora_file(tiny_unet(), path, adapter_name="kohya")
    for name in chosen:
        scale = ours.get_base_model().get_submodule(name).scaling["kohya"]
        assert scale == (1.0 if name.endswith("to_out.0") else 0.5), name


def test_style_mixing_equals_diffusers_set_adapters_and_the_merged_mix(tmp_path):
    files = {}
    for name, seed in (("ink", 11), ("pastel", 12)):
        save_diffusers_lora(_ours(seed=seed), tmp_path / name)
        files[name] = tmp_path / name / "pytorch_lora_weights.safetensors"
    ours = load_lora_file(tiny_unet(), files["ink"], adapter_name="ink")
    load_lora_file(ours, files["pastel"], adapter_name="pastel")
    ours.set_adapter(["ink", "pastel"], weights=[0.7, 0.4])
    unet = tiny_unet()
    for name, path in files.items():
        unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name=name)
    unet.set_adapters(["ink", "pastel"], [0.7, 0.4])
    mixed = _out(ours, _unet_inputs())
    torch.testing.assert_close(mixed, _out(unet, _unet_inputs()), rtol=1e-5, atol=1e-5)
    ours.merge_adapter()  # one UNet with the mix folded in: no adapter at inference
    torch.testing.assert_close(_out(ours, _unet_inputs()), mixed, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    ours.set_adapter(["ink", "pastel"], weights=[1.0, 1.0])  # combine from each config's own scale
    ours.add_weighted_adapter(["ink", "pastel"], [0.7, 0.4], "blend", combination_type="cat")
    ours.set_adapter("blend")
    torch.testing.assert_close(_out(ours, _unet_inputs()), mixed, rtol=1e-5, atol=1e-5)
    ours.set_adapter(["ink", "pastel"], weights=[1.0, 0.0])  # weights restart from each config's scale
    alone = load_lora_file(tiny_unet(), files["ink"], adapter_name="ink")
    torch.testing.assert_close(_out(ours, _unet_inputs()), _out(alone, _unet_inputs()), rtol=1e-5, atol=1e-5)


def test_bad_files_and_adapters_are_refused_by_name(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="only .safetensors"):
        load_lora_file(tiny_unet(), tmp_path / "w.bin")
    sdxl = "lora_unet_input_blocks_4_1_proj_in"  # the original SD layout's name, not diffusers'
    save_file(
        {f"{sdxl}.lora_down.weight": torch.zeros(2, 8), f"{sdxl}.lora_up.weight": torch.zeros(8, 2)},
        str(tmp_path / "sdxl.safetensors"),
    )
    with pytest.raises(ConfigError, match="match no module.*input_blocks_4_1_proj_in.*diffusers' conversion"):
        load_lora_file(tiny_unet(), tmp_path / "sdxl.safetensors")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ConfigError, match="LyCORIS"):
        load_lora_file(tiny_unet(), tmp_path / "loha.safetensors")
    ia3 = dt.get_peft_model(tiny_unet(), dt.IA3Config(target_modules=["to_k", "to_v"], feedforward_modules=[]))
    with pytest.raises(ConfigError, match="hold LoRA adapters; 'default' is IA3"):
        save_diffusers_lora(ia3, tmp_path / "ia3")
    with pytest.raises(dt.errors.AdapterError, match="2 weights for 1 adapters"):
        _ours().set_adapter(["default"], weights=[0.5, 0.5])


def test_a_few_images_train_a_lora_by_noise_prediction():
    """DreamBooth-style: four 'images' (latents) of one subject and their caption; the LoRA learns to predict the
    noise on them (the loss falls) and only the LoRA tensors change."""
    model = dt.get_peft_model(tiny_unet(), dt.LoraConfig(r=4, lora_alpha=4, target_modules=[*ATTENTION, "conv1"]))
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    caption = torch.randn(1, 5, 12, generator=g).expand(4, -1, -1)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_noise_prediction(model, latents, caption, steps=60, lr=1e-2, batch_size=4, seed=0)
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
