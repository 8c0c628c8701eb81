"""peft-style user scripts, written here as a peft user would write them: each runs against peft (which proves the
script) and against deltatune with only the import changed. The scripts check themselves with asserts."""

from __future__ import annotations

import re
import textwrap

import pytest

SCRIPTS = {
    "quicktour": """
        import torch
        from peft import LoraConfig, PeftModel, TaskType, get_peft_model
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=16, lora_dropout=0.1,
                            target_modules=["q_proj", "v_proj"])
        model = get_peft_model(make_base(), config)
        model.print_trainable_parameters()
        trainable, total = model.get_nb_trainable_parameters()
        assert trainable == 2 * 4 * ((32 + 32) + (32 + 16))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        model.eval()
        want = model(input_ids=ids).logits
        model.save_pretrained(out / "adapter")
        loaded = PeftModel.from_pretrained(make_base(), out / "adapter")
        assert not any(p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    """,
    "several_adapters": """
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        model = get_peft_model(make_base(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        first = model(input_ids=ids).logits
        model.set_adapter("other")
        assert model.active_adapter == "other"
        second = model(input_ids=ids).logits
        assert not torch.allclose(first, second)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, make_base()(input_ids=ids).logits)
        model.set_adapter("default")
        model.delete_adapter("other")
        assert list(model.peft_config) == ["default"]
        torch.testing.assert_close(model(input_ids=ids).logits, first)
    """,
    "state_dict_helpers": """
        import torch
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        from peft import load_peft_weights
        source = get_peft_model(make_base(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        state = get_peft_model_state_dict(source)
        assert all(k.startswith("base_model.model.") and ".default." not in k for k in state)
        target = get_peft_model(make_base(), LoraConfig(r=2, target_modules=["q_proj"]))
        set_peft_model_state_dict(target, state)
        torch.testing.assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits)
        source.save_pretrained(out / "a")
        assert set(load_peft_weights(str(out / "a"))) == set(state)
    """,
    "loraplus": """
        import torch
        from peft import LoraConfig, get_peft_model
        from peft.optimizers import create_loraplus_optimizer
        model = get_peft_model(make_base(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        optimizer = create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=1e-3,
                                              loraplus_lr_ratio=8)
        assert max(g["lr"] for g in optimizer.param_groups) == pytest_approx(8e-3)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    """,
    "kbit_preparation": """
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        base = prepare_model_for_kbit_training(make_base(), use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    """,
    "auto_class": """
        import torch
        from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                init_lora_weights=False))
        model.save_pretrained(out / "auto")
        loaded = AutoPeftModelForCausalLM.from_pretrained(out / "auto")
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    """,
    "trainer": """
        import os
        import torch
        from peft import LoraConfig, PeftModel, TaskType, get_peft_model
        from transformers import Trainer, TrainingArguments
        model = get_peft_model(make_base(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"]))
        rows = [{"input_ids": row, "attention_mask": [1] * len(row), "labels": row, "text": "x"}
                for row in ids.repeat(4, 1).tolist()]
        args = TrainingArguments(output_dir=str(out / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4])
        trainer.train()
        assert trainer.evaluate()["eval_loss"] > 0
        trainer.save_model(str(out / "final"))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "final"))
        assert os.path.exists(out / "run" / "checkpoint-2" / "adapter_model.safetensors")
        model.eval()
        loaded = PeftModel.from_pretrained(make_base(), str(out / "final"))
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        again = get_peft_model(make_base(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["q_proj"]))
        resumed = Trainer(model=again, args=args, train_dataset=rows)
        resumed.train(resume_from_checkpoint=str(out / "run" / "checkpoint-2"))
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    """,
    "ia3_and_ln_tuning": """
        import torch
        from peft import IA3Config, LNTuningConfig, PeftModel, get_peft_model
        for config in (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                       LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"])):
            model = get_peft_model(make_base(), config)
            model.print_trainable_parameters()
            torch.testing.assert_close(model(input_ids=ids).logits, make_base()(input_ids=ids).logits)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.mul_(1.5)
            want = model(input_ids=ids).logits
            name = type(config).__name__
            model.save_pretrained(out / name)
            loaded = PeftModel.from_pretrained(make_base(), out / name)
            torch.testing.assert_close(loaded(input_ids=ids).logits, want)
            merged = loaded.merge_and_unload()
            torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
    """,
    "inference_loading": """
        import torch
        from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
        trained = get_peft_model(make_base(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        trained.save_pretrained(out / "adapter")
        config = PeftConfig.from_pretrained(out / "adapter")
        assert config.peft_type == "LORA" and config.r == 2
        model = PeftModel.from_pretrained(make_base(), out / "adapter")
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        model.load_adapter(out / "adapter", adapter_name="second")
        model.set_adapter("second")
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)
            tokens = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
        assert tokens.shape == (1, ids.shape[1] + 3)
    """,
}


def _as(library: str, script: str) -> str:
    """The script with its imports pointed at `library` (the only change a user makes)."""
    return re.sub(r"^(\s*)(from|import) peft\b", rf"\1\2 {library}", textwrap.dedent(script), flags=re.M)


@pytest.mark.parametrize("library", ["peft", "deltatune"])
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_peft_user_script_runs_with_only_the_import_changed(name, library, tmp_path, tiny_model_dir):
    if library == "peft":
        pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    def make_base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    namespace = {
        "make_base": make_base,
        "ids": torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0)),
        "out": tmp_path,
        "base_dir": str(tiny_model_dir),
        "pytest_approx": pytest.approx,
    }
    torch.manual_seed(0)
    exec(compile(_as(library, SCRIPTS[name]), f"<{name} with {library}>", "exec"), namespace)
