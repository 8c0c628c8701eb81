"""Run by test_distributed under `accelerate launch` (2 CPU processes): transformers.Trainer trains a deltatune LoRA
model; rank 0 saves the adapter from the accelerator's full state dict; each rank writes its losses and how the
model was wrapped. argv: model_dir out_dir"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import deltatune as dt

model_dir, out = sys.argv[1], Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
torch.manual_seed(0)
model = dt.get_peft_model(
    AutoModelForCausalLM.from_pretrained(model_dir),
    dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
)
g = torch.Generator().manual_seed(1)
rows = [torch.randint(3, 90, (16,), generator=g) for _ in range(16)]
dataset = [{"input_ids": r, "labels": r} for r in rows]
args = TrainingArguments(
    output_dir=str(out / "hf"),
    per_device_train_batch_size=2,
    max_steps=4,
    learning_rate=1e-2,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    remove_unused_columns=False,
    disable_tqdm=True,
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=dataset,
    data_collator=lambda batch: {k: torch.stack([b[k] for b in batch]) for k in batch[0]},
)
trainer.train()
wrapped = f"{trainer.accelerator.distributed_type.value} {type(trainer.model_wrapped).__name__}"
state = trainer.accelerator.get_state_dict(trainer.model)  # the full state (gathered, were it sharded)
rank = dist.get_rank() if dist.is_initialized() else 0
if rank == 0:
    model.save_pretrained(out / "adapter", state_dict=state)
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
(out / f"losses-{rank}.txt").write_text(" ".join(repr(v) for v in losses))
(out / f"wrapped-{rank}.txt").write_text(wrapped)
if dist.is_initialized():
    dist.barrier()
    sys.stdout.flush()  # then leave without the interpreter's teardown (see ddp_worker.py)
    sys.stderr.flush()
    os._exit(0)
