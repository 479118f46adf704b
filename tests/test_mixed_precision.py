"""Mixed precision: float32 state for bf16 parameters, bf16 autocast training, fp16 gradient scaling."""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import tiny  # noqa: E402

import ginger_hf  # noqa: E402


def test_bf16_params_get_float32_state_by_default_and_keep_it_through_a_checkpoint():
    model = torch.nn.Linear(6, 5).to(torch.bfloat16)
    opt = ginger_hf.Ginger(model.parameters(), curvature="empirical", tau=2)
    override = ginger_hf.Ginger([torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))], curvature="empirical",
                                state_dtype=torch.bfloat16)
    model(torch.randn(3, 6, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    override.param_groups[0]["params"][0].grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    override.step()
    for st in opt.state.values():
        assert st["m"].dtype == st["U"].dtype == torch.float32 and st["s"].dtype == torch.float64
    (st,) = override.state.values()
    assert st["m"].dtype == st["U"].dtype == torch.bfloat16

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = ginger_hf.Ginger(model.parameters(), curvature="empirical", tau=2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for p in model.parameters():
        for key in ("m", "U", "s"):
            assert fresh.state[p][key].dtype == opt.state[p][key].dtype
            assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_bf16_autocast_tiny_t5_trains_200_steps_without_nan():
    torch.manual_seed(0)
    model = tiny.tiny_t5(seed=0, dropout=0.0)
    opt = ginger_hf.Ginger(model.parameters(), lr=1e-3, tau=2, curvature="mc")
    data = tiny.collate(tiny.make_data(8, seed=2))
    losses = []
    for _ in range(200):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**data)
        assert out.logits.dtype == torch.bfloat16  # autocast is really on
        ginger_hf.add_sampled_label_curvature(out.logits, data["labels"], opt)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert sum(st["skipped"] for st in opt.state.values()) == 0
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10  # and it learns


def test_trainer_bf16_true_trains_tiny_t5_200_steps_without_nan(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    class Watch(TrainerCallback):
        finite = []

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.finite.append(all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None))

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), optim="ginger", optim_args="tau=2,curvature=mc", learning_rate=1e-3, bf16=True,
        per_device_train_batch_size=8, max_steps=200, save_strategy="no", use_cpu=True, report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=0, logging_steps=20,
    )
    model = tiny.tiny_t5(seed=0, dropout=0.0)
    logits_dtype = []
    model.lm_head.register_forward_hook(lambda m, a, out: logits_dtype.append(out.dtype))
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=tiny.make_data(64, seed=2), callbacks=[Watch()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    ginger = ginger_hf.unwrap_ginger(trainer.optimizer)
    assert set(logits_dtype) == {torch.bfloat16}  # autocast was on for every forward
    assert len(Watch.finite) == 200 and all(Watch.finite)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for st in ginger.state.values() for v in st.values() if torch.is_tensor(v))
    assert sum(st["skipped"] for st in ginger.state.values()) == 0
    assert all(st["step"] == 200 for st in ginger.state.values())


def _sampled_curvature(model, data, opt, grad_scaler=None):
    out = model(**data)
    gen = torch.Generator().manual_seed(11)
    ginger_hf.add_sampled_label_curvature(out.logits, data["labels"], opt, generator=gen, grad_scaler=grad_scaler)
    curv = [ginger_hf.get_curvature(p).clone() for p in model.parameters()]
    ginger_hf.unwrap_ginger(opt).zero_curvature()
    return out, curv


def test_fp16_grad_scaler_curvature_is_unscaled_like_the_gradient():
    """The sampled loss is back-propagated scaled (2**16) and unscaled exactly, as the scaler does for .grad."""
    model = tiny.tiny_t5(seed=0, dropout=0.0)
    opt = ginger_hf.Ginger(model.parameters(), curvature="mc")
    data = tiny.collate(tiny.make_data(4, seed=2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    _, plain = _sampled_curvature(model, data, opt)
    out, scaled = _sampled_curvature(model, data, opt, grad_scaler=scaler)
    for a, b in zip(plain, scaled):
        assert torch.equal(a, b)

    # Same through accelerate's AcceleratedOptimizer, which carries the scaler under fp16.
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    seen = []
    real_scale = scaler.scale
    scaler.scale = lambda loss: seen.append(1) or real_scale(loss)
    try:
        AcceleratorState._reset_state(True)
        Accelerator(cpu=True)
        _, wrapped = _sampled_curvature(model, data, AcceleratedOptimizer(opt, device_placement=False, scaler=scaler))
    finally:
        AcceleratorState._reset_state(True)
    assert seen and all(torch.equal(a, b) for a, b in zip(plain, wrapped))

    # The gradient the scaler unscales has the same scale as the curvature (no 2**16 left in either).
    scaler.scale(out.loss).backward()
    scaler.unscale_(opt)
    reference = torch.autograd.grad(model(**data).loss, list(model.parameters()), allow_unused=True)
    for p, g in zip(model.parameters(), reference):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)


def _fp16_step(model, opt, scaler, data, gen_seed, inject_inf=False):
    out = model(**data)
    gen = torch.Generator().manual_seed(gen_seed)
    ginger_hf.add_sampled_label_curvature(out.logits, data["labels"], opt, generator=gen, grad_scaler=scaler)
    scaler.scale(out.loss).backward()
    if inject_inf:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def _state(opt):
    return {(i, k): (v.clone() if torch.is_tensor(v) else v)
            for i, st in enumerate(opt.state.values()) for k, v in st.items()}


def test_fp16_overflow_step_leaves_ginger_state_bit_identical_and_its_curvature_does_not_leak():
    model = tiny.tiny_t5(seed=0, dropout=0.0)
    opt = ginger_hf.Ginger(model.parameters(), lr=1e-3, tau=2, curvature="mc")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = [tiny.collate(tiny.make_data(4, seed=s)) for s in range(3)]
    _fp16_step(model, opt, scaler, batches[0], gen_seed=0)

    twin_model = copy.deepcopy(model)  # the same run without the overflowing step
    twin_opt = ginger_hf.Ginger(twin_model.parameters(), lr=1e-3, tau=2, curvature="mc")
    twin_opt.load_state_dict(opt.state_dict())
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    before = _state(opt)
    params_before = [p.detach().clone() for p in model.parameters()]
    _fp16_step(model, opt, scaler, batches[1], gen_seed=1, inject_inf=True)
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf and skipped Ginger's step
    after = _state(opt)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) if torch.is_tensor(before[k]) else before[k] == after[k] for k in before)
    assert all(torch.equal(a, p) for a, p in zip(params_before, model.parameters()))
    assert all(ginger_hf.get_curvature(p) is None for p in model.parameters())  # zero_grad dropped it

    _fp16_step(model, opt, scaler, batches[2], gen_seed=2)
    _fp16_step(twin_model, twin_opt, twin_scaler, batches[2], gen_seed=2)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    for k, v in _state(opt).items():
        w = _state(twin_opt)[k]
        assert torch.equal(v, w) if torch.is_tensor(v) else v == w


def test_trainer_fp16_scaler_overflow_skips_cleanly_and_scales_curvature_like_the_loss(tmp_path):
    """The Trainer with accelerate's GradScaler (injected: accelerate only builds one on GPUs).

    An inf in the gradients and curvature of step 3 makes the scaler skip it; the next steps must not
    see that curvature (Ginger would skip blocks with non-finite curvature), and the curvature hook
    must back-propagate the scaled sampled loss like the true loss.
    """
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), optim="ginger", optim_args="tau=2,curvature=mc,curvature_interval=1", learning_rate=1e-3,
        per_device_train_batch_size=4, max_steps=6, max_grad_norm=0.0, save_strategy="no", use_cpu=True,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    model = tiny.tiny_t5(seed=0, dropout=0.0)
    overflow = {"now": False}
    skipped = []

    class Inject(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            overflow["now"] = state.global_step == 2

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            skipped.append(optimizer.step_was_skipped)

    weight = model.lm_head.weight
    weight.register_hook(lambda g: g * float("inf") if overflow["now"] else g)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=tiny.make_data(64, seed=2), callbacks=[Inject()])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.accelerator.scaler = scaler  # what `fp16=True` sets up on a GPU
    scaled_losses = []
    real_scale = scaler.scale
    scaler.scale = lambda loss: scaled_losses.append(loss.detach().clone()) or real_scale(loss)
    trainer.train()

    ginger = ginger_hf.unwrap_ginger(trainer.optimizer)
    assert ginger.grad_scaler is scaler
    assert skipped == [False, False, True, False, False, False]
    assert scaler.get_scale() == 2.0**9
    assert len(scaled_losses) == 12  # every step: the sampled-label loss and the true loss
    assert sum(st["skipped"] for st in ginger.state.values()) == 0  # no inf curvature leaked into step 4
    assert all(st["step"] == 5 for st in ginger.state.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
