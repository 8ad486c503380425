"""`torch_compile` (TrainingArguments' own flag, inductor) and bf16 autocast on CPU through `SiglipTrainer`: the
compiled model trains as eager does, with and without GradCache accumulation; bf16 trains close to fp32."""

import math

import pytest
import torch

import hf_siglip as hs
from conftest import tiny_training_setup


def train(tmp_path, batch_size=8, accumulation=1, steps=2, **overrides):
    """Losses, final weights and the dtypes of a vision-tower Linear's outputs, for a fresh tiny model (seed 0)."""
    model, _, collator, dataset = tiny_training_setup()
    dtypes = set()
    model.vision_model.encoder.layers[0].mlp.fc1.register_forward_hook(  # a Linear: bf16 under autocast
        lambda module, args, output: dtypes.add(output.dtype))
    args = hs.SiglipTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=steps, optim="sgd", learning_rate=0.05, lr_scheduler_type="constant", weight_decay=0.0,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_drop_last=True,
        max_grad_norm=0.0, disable_tqdm=True, **overrides)
    trainer = hs.SiglipTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset["train"])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()]), dtypes


def test_torch_compile_trains_as_eager_with_and_without_gradient_accumulation(tmp_path):
    """One test for compile (inductor is slow to compile on 2 cores): the same micro-batch shape in both runs, so the
    second compiled run reuses the first's training graph and adds only GradCache's no-grad graph. The pair loss runs
    outside the compiled model (Trainer compiles the model's forward)."""
    for accumulation in (1, 2):
        eager_losses, eager_weights, _ = train(tmp_path / f"eager{accumulation}", accumulation=accumulation)
        compiled_losses, compiled_weights, _ = train(tmp_path / f"compiled{accumulation}", accumulation=accumulation,
                                                     torch_compile=True, torch_compile_backend="inductor")
        assert len(compiled_losses) == 2
        assert compiled_losses == pytest.approx(eager_losses, rel=1e-4), accumulation
        assert torch.allclose(compiled_weights, eager_weights, rtol=1e-4, atol=1e-5), accumulation


def test_bf16_autocast_on_cpu_trains_close_to_fp32(tmp_path):
    fp32_losses, fp32_weights, fp32_dtypes = train(tmp_path / "fp32", batch_size=16, steps=3)
    for accumulation in (1, 2):  # the plain step and GradCache (no-grad pass and re-forward both under autocast)
        losses, weights, dtypes = train(tmp_path / f"bf16_{accumulation}", batch_size=16 // accumulation,
                                        accumulation=accumulation, steps=3, bf16=True)
        assert fp32_dtypes == {torch.float32} and dtypes == {torch.bfloat16}  # autocast did run the tower in bf16
        assert all(math.isfinite(loss) for loss in losses)
        assert losses == pytest.approx(fp32_losses, rel=1e-2)  # bf16 keeps 8 bits of mantissa (here: <= 0.4%)
        assert weights.dtype == torch.float32  # autocast: the weights and their updates stay fp32
        assert torch.allclose(weights, fp32_weights, atol=2e-2)
        assert not torch.equal(weights, fp32_weights)
