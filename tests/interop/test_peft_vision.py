"""Image classification with LoRA and a new head (peft's ViT guide): ViT and ConvNeXt adapters move both ways with
peft, and a run with `transformers.Trainer` on a generated image set lifts held-out accuracy."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

import deltatune as dt
from tests.conftest import perturb_trainable

peft = pytest.importorskip("peft")


def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=2)  # fmt: skip
    return ViTForImageClassification(config).eval()


def tiny_convnext():
    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2,
                            image_size=16)  # fmt: skip
    return ConvNextForImageClassification(config).eval()


def bar_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 16, 16) noisy images with one bright bar two pixels wide at a random place: label 0 horizontal, 1
    vertical."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    labels = torch.randint(0, 2, (n,), generator=g)
    places = torch.randint(1, 15, (n,), generator=g)
    for i, (label, place) in enumerate(zip(labels.tolist(), places.tolist(), strict=True)):
        if label == 0:
            images[i, :, place - 1 : place + 1, :] += 2.0
        else:
            images[i, :, :, place - 1 : place + 1] += 2.0
    return images, labels


CASES = {
    "vit": (tiny_vit, ["q_proj", "v_proj"], 4),
    # ConvNeXt: the depthwise 7x7 convolutions (grouped: 8 and 16 groups, so a rank both divide) and the pointwise
    # linear layers
    "convnext": (tiny_convnext, ["dwconv", "pwconv1", "pwconv2"], 16),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_image_classifier_adapter_moves_between_the_libraries(family, direction, tmp_path):
    make, targets, rank = CASES[family]
    source, target = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    config = source.LoraConfig(r=rank, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
    model = source.get_peft_model(make(), config)
    perturb_trainable(model, seed=5, scale=0.3)
    pixels = bar_images(4, 9)[0]
    with torch.no_grad():
        want = model.eval()(pixel_values=pixels).logits
        assert (want - make()(pixel_values=pixels).logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = target.PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, want, rtol=1e-5, atol=1e-5)


def test_vit_defaults_to_peft_style_attention_targets():
    model = dt.get_peft_model(tiny_vit(), dt.LoraConfig(r=4, modules_to_save=["classifier"]))
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


class _Images(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def _accuracy(model, images, labels):
    model.eval()
    with torch.no_grad():
        return (model(pixel_values=images).logits.argmax(-1) == labels).float().mean().item()


def test_lora_and_a_new_head_learn_a_generated_image_set_with_transformers_trainer(tmp_path):
    """peft's image-classification recipe, run by `transformers.Trainer` on a deltatune model: held-out accuracy
    from chance to >= 90 %, only LoRA and the head trained, and the saved adapter predicts the same labels."""
    model = dt.get_peft_model(tiny_vit(), dt.LoraConfig(r=4, lora_alpha=8, modules_to_save=["classifier"]))
    train_images, train_labels = bar_images(256, 0)
    test_images, test_labels = bar_images(64, 1)
    before = _accuracy(model, test_images, test_labels)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=32, num_train_epochs=10, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False, seed=0, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=_Images(train_images, train_labels)).train()
    after = _accuracy(model, test_images, test_labels)
    assert before < 0.65 and after >= 0.9, (before, after)
    model.save_pretrained(tmp_path / "adapter")
    loaded = dt.PeftModel.from_pretrained(tiny_vit(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(pixel_values=test_images).logits, model(pixel_values=test_images).logits, rtol=1e-5, atol=1e-5
        )
