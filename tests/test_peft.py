"""LoRA through peft (`hf-siglip train --use_peft`, hf_siglip.lora): the adapted layers and the trainable count
against an independent count, the adapter loaded by peft's own `PeftModel.from_pretrained` on the native base, the
merged model by plain transformers, and the same weights from 1 process, 2 gloo processes (the ring loss, DDP) and
GradCache accumulation (2 x 8 = 16)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, SiglipModel

from cli_helpers import TINY, cli_env, launcher_binary, run_train
from finetune_helpers import checkpoint_flags, native_tiny_checkpoint_16  # noqa: F401 (fixture)
from hf_siglip.cli.arguments import SiglipModelArguments, SiglipScriptArguments, configuration_problems
from hf_siglip.dual_encoders import load_dual_encoder
from hf_siglip.lora import add_lora, lora_target_names

peft = pytest.importorskip("peft")  # the optional `peft` extra

RANK, HIDDEN = 4, 32  # the tiny checkpoint: width 32, one block per tower
# plain SGD: Adam's normalised step would amplify the fp32 summation-order differences between the runs
LORA = {"use_peft": "true", "lora_r": RANK, "lora_alpha": 8, "lora_dropout": 0.0, "optim": "sgd",
        "learning_rate": 0.5, "warmup_steps": 0, "lr_scheduler_type": "constant", "max_steps": 3,
        "eval_split": "None", "disable_tqdm": "true"}


def test_adapters_go_on_the_chosen_towers_linear_layers_and_only_they_train(native_tiny_checkpoint_16):
    model = load_dual_encoder(str(native_tiny_checkpoint_16))
    names = lora_target_names(model, ["vision"], ["q_proj", "v_proj", "out_proj"])
    # the attention pooling head's out_proj belongs to nn.MultiheadAttention, which reads its weight directly
    assert sorted(names) == [f"vision_model.encoder.layers.0.self_attn.{name}" for name in ("out_proj", "q_proj",
                                                                                          "v_proj")]
    add_lora(model, r=RANK, towers=["text", "vision"])  # default: q, k, v, out projections of both towers
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    # 2 towers x 4 projections of 32 -> 32, each an A (r x 32) and a B (32 x r)
    assert sum(trainable.values()) == 2 * 4 * RANK * (HIDDEN + HIDDEN)
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    with pytest.raises(ValueError, match="no linear layer of that name"):
        lora_target_names(model, ["text"], ["qkv"])


def test_settings_that_cannot_work_are_refused_in_one_line(native_tiny_checkpoint_16):
    def problems(**values):
        return configuration_problems(SiglipScriptArguments(max_length=12), SiglipModelArguments(**values), None)

    assert problems(model_name_or_path=str(native_tiny_checkpoint_16), use_peft=True) == []
    assert problems(use_peft=True) == ["use_peft adapts a checkpoint: set model_name_or_path (new towers train in "
                                       "full)"]
    assert problems(merge_adapter=True) == ["merge_adapter merges a LoRA adapter: set use_peft too"]
    (towers,) = problems(model_name_or_path=str(native_tiny_checkpoint_16), use_peft=True, lora_towers=["image"])
    assert towers.startswith("lora_towers must name one or both of ['text', 'vision']")


def adapter_weights(folder) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def test_lora_through_hf_siglip_train_one_process_two_processes_and_grad_cache(native_tiny_checkpoint_16,
                                                                                tmp_path):
    base = native_tiny_checkpoint_16
    one = tmp_path / "one"  # 1 process, batch 16, merged
    run = run_train(checkpoint_flags({**TINY, **LORA, "output_dir": one, "merge_adapter": "true",
                                      "save_strategy": "steps", "save_steps": 2}, base))
    assert run.returncode == 0, run.stderr[-3000:]
    adapters = 2 * 4 * RANK * 2 * HIDDEN
    assert f"parameters: {adapters:,} trainable" in run.stdout and f"(LoRA: {adapters:,} in adapters" in run.stdout

    two = tmp_path / "two"  # 2 gloo processes of 8: the ring loss over DDP
    accelerate = [launcher_binary("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", "29651"]
    run = run_train(checkpoint_flags({**TINY, **LORA, "output_dir": two, "merge_adapter": "true", "use_cpu": "false",
                                      "per_device_train_batch_size": 8}, base), accelerate,
                    env=cli_env(ACCELERATE_USE_CPU="1"))
    assert run.returncode == 0, run.stderr[-3000:]

    cached = tmp_path / "cached"  # 1 process, 2 micro-batches of 8 (GradCache), the adapter only
    run = run_train(checkpoint_flags({**TINY, **LORA, "output_dir": cached, "per_device_train_batch_size": 8,
                                      "gradient_accumulation_steps": 2}, base))
    assert run.returncode == 0, run.stderr[-3000:]

    resumed = tmp_path / "resumed"  # the Trainer's checkpoints hold the injected model: resuming continues it
    run = run_train(checkpoint_flags({**TINY, **LORA, "output_dir": resumed, "merge_adapter": "true",
                                      "resume_from_checkpoint": one / "checkpoint-2"}, base))
    assert run.returncode == 0, run.stderr[-3000:]

    # peft's files; an adapter-only folder holds no model weights (transformers would read them as a full model)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (one / "adapter").iterdir()}
    assert not (cached / "model.safetensors").exists() and (cached / "adapter_config.json").exists()
    assert f"| LoRA (peft) | r 4, alpha 8, dropout 0.0, text + vision tower(s), {adapters:,} adapter parameters; " \
           "saved as the adapter |" in (cached / "README.md").read_text()  # the model card says so
    reference = adapter_weights(one / "adapter")
    assert reference.keys() == adapter_weights(cached).keys() == adapter_weights(two / "adapter").keys()
    assert all(torch.equal(adapter_weights(resumed / "adapter")[name], value) for name, value in reference.items())
    for name, value in reference.items():
        assert torch.allclose(adapter_weights(two / "adapter")[name], value, atol=1e-6, rtol=0), name
        assert torch.allclose(adapter_weights(cached)[name], value, atol=1e-6, rtol=0), name
    assert max(value.abs().max().item() for name, value in reference.items() if "lora_B" in name) > 1e-3  # trained

    # the merged model: plain transformers, the same weights from both launches, base weights outside the adapters
    merged, loading = AutoModel.from_pretrained(one, output_loading_info=True)
    assert type(merged).__name__ == "SiglipModel" and not loading["missing_keys"] and not loading["unexpected_keys"]
    merged_two = SiglipModel.from_pretrained(two).state_dict()
    start = SiglipModel.from_pretrained(base).state_dict()
    for name, value in merged.state_dict().items():
        assert torch.allclose(merged_two[name], value, atol=1e-6, rtol=0), name
        adapted = name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight")) and \
            ".head." not in name
        assert adapted != torch.equal(start[name], value), name  # only the adapted layers changed

    # peft's own loader on the native base gives the merged model's embeddings
    adapted = peft.PeftModel.from_pretrained(SiglipModel.from_pretrained(base), str(cached)).eval()
    # and so does transformers' own adapter loading (the card's `AutoModel.from_pretrained(folder)`)
    auto = AutoModel.from_pretrained(cached).eval()
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        for method, inputs in (("get_image_features", {"pixel_values": pixels}),
                               ("get_text_features", {"input_ids": ids})):
            ours = getattr(adapted, method)(**inputs).pooler_output
            native = getattr(merged.eval(), method)(**inputs).pooler_output
            assert torch.allclose(ours, native, atol=1e-5), method
            assert torch.equal(getattr(auto, method)(**inputs).pooler_output, ours), method
