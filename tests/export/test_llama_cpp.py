"""The exported adapter in a real llama.cpp (llama-cpp-python, test-only: `make test-export` builds it), on the
original SmolLM2-135M-Instruct.Q4_1.gguf, and the merged GGUF: both answer the quickstart's held-out dates as
deltatune does."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")


@pytest.mark.timeout(900)  # trains the quickstart, then three llama.cpp models answer 64 prompts each
def test_llama_cpp_with_the_exported_adapter_answers_like_deltatune(tmp_path):
    from deltatune.export import export_gguf_adapter
    from deltatune.pretrained import bundled_gguf_path
    from deltatune.train import load_train_config, train
    from deltatune.train.data import _render, read_records, to_messages
    from deltatune.train.evaluate import exact_match, generate_answers

    cfg = load_train_config(None, [f"output_dir={tmp_path / 'qs'}", "data.general_eval=null"])
    result = train(cfg)
    export_gguf_adapter(result.adapter_dir, tmp_path / "adapter.gguf")
    records = read_records("bundled:quickstart", "test")[:64]
    from transformers import AutoTokenizer

    from deltatune.pretrained import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    prompts = [_render(tokenizer, to_messages(r, cfg.data)[:-1], add_generation_prompt=True) for r in records]
    ours = generate_answers(result.model, tokenizer, prompts, 12, "cpu")
    llm = llama_cpp.Llama(model_path=str(bundled_gguf_path()), lora_path=str(tmp_path / "adapter.gguf"), n_ctx=512,
                          n_threads=2, seed=0, verbose=False)  # fmt: skip
    theirs = [llm.create_completion(prompt=p, max_tokens=12, temperature=0.0, top_k=1)["choices"][0]["text"]
              for p in prompts]  # fmt: skip
    references = [r["response"] for r in records]
    same = sum(a.strip() == b.strip() for a, b in zip(ours, theirs, strict=True)) / len(records)
    ours_right = sum(exact_match(a, r) for a, r in zip(ours, references, strict=True)) / len(records)
    theirs_right = sum(exact_match(a, r) for a, r in zip(theirs, references, strict=True)) / len(records)
    print(f"identical answers {same:.3f}; exact match deltatune {ours_right:.3f}, llama.cpp {theirs_right:.3f}")
    assert same >= 0.9 and theirs_right >= ours_right - 0.05
    from deltatune.export import export_gguf_merged

    export_gguf_merged(bundled_gguf_path(), result.adapter_dir, tmp_path / "merged" / "model.gguf")
    merged = llama_cpp.Llama(model_path=str(tmp_path / "merged" / "model.gguf"), n_ctx=512, n_threads=2, seed=0,
                             verbose=False)  # fmt: skip
    merged_answers = [merged.create_completion(prompt=p, max_tokens=12, temperature=0.0, top_k=1)["choices"][0]["text"]
                      for p in prompts]  # fmt: skip
    merged_same = sum(a.strip() == b.strip() for a, b in zip(ours, merged_answers, strict=True)) / len(records)
    print(f"merged f16 GGUF: identical answers {merged_same:.3f}")
    assert merged_same >= 0.9
    from deltatune.export import export_gguf_from_hf

    export_gguf_from_hf(default_model_dir(), tmp_path / "from_hf" / "model.gguf", result.adapter_dir)  # no GGUF source
    converted = llama_cpp.Llama(model_path=str(tmp_path / "from_hf" / "model.gguf"), n_ctx=512, n_threads=2, seed=0,
                                verbose=False)  # fmt: skip
    converted_answers = [converted.create_completion(prompt=p, max_tokens=12, temperature=0.0, top_k=1)["choices"][0][
        "text"] for p in prompts]  # fmt: skip
    converted_same = sum(a.strip() == b.strip() for a, b in zip(ours, converted_answers, strict=True)) / len(records)
    print(f"HF directory -> GGUF (f16, merged): identical answers {converted_same:.3f}")
    assert converted_same >= 0.9
    plain = llama_cpp.Llama(model_path=str(bundled_gguf_path()), n_ctx=512, n_threads=2, seed=0, verbose=False)
    base_right = sum(exact_match(plain.create_completion(prompt=p, max_tokens=12, temperature=0.0, top_k=1)[
        "choices"][0]["text"], r) for p, r in zip(prompts[:16], references[:16], strict=True)) / 16  # fmt: skip
    assert base_right < theirs_right  # the adapter is what makes llama.cpp answer
