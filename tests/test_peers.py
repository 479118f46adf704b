"""The peers of the harness (recipes/offline_tasks/peers.py): Muon's construction and float32 iteration,
Adam-mini's T5 partition, and that every peer follows the learning rate the scheduler writes."""

import copy

import pytest
import torch
from helpers import tiny_t5

from offline_tasks import peers, proxy


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) if p.requires_grad else None


def test_muon_split_gives_muon_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_t5()
    hidden, rest = peers.muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden_names, rest_names = {names[id(p)] for p in hidden}, {names[id(p)] for p in rest}
    assert not hidden_names & rest_names
    assert hidden_names | rest_names == set(names.values())
    assert all(p.ndim == 2 for p in hidden)
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in hidden_names
    assert "decoder.block.1.layer.2.DenseReluDense.wo.weight" in hidden_names
    # the tied embedding / LM head, the relative-position embedding (2-D) and the norms go to AdamW
    assert "shared.weight" in rest_names
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in rest_names
    assert "encoder.final_layer_norm.weight" in rest_names
    assert all("DenseReluDense" not in n and not n.endswith((".q.weight", ".k.weight")) for n in rest_names)


def test_muon_split_of_a_lora_model_trains_only_the_adapters_and_norms():
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(tiny_t5(), LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **proxy.LORA))
    hidden, rest = peers.muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert hidden and all("lora_" in names[id(p)] for p in hidden)
    assert rest and all("layer_norm" in names[id(p)] for p in rest)
    assert len(hidden) + len(rest) == sum(p.requires_grad for p in model.parameters())


def test_muon_in_bfloat16_is_torch_muon_bit_for_bit():
    """With torch's bfloat16 iteration, MuonAdamW's hidden-matrix step is torch.optim.Muon's exactly."""
    model = tiny_t5()
    hidden, _ = peers.muon_split(model)
    ours = [p.detach().clone() for p in hidden]
    theirs = [p.detach().clone() for p in hidden]
    opt = peers.MuonAdamW(ours, [], lr=0.02, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_muon_in_float32_matches_torch_muon_to_bfloat16_rounding():
    """The float32 iteration (the CPU default) computes the same map: one step differs from torch's by what
    bfloat16 rounding through five iterations makes of it (1.2-1.8% of the step here, FINDINGS: about 1%)."""
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96)]:
        start = torch.randn(shape)
        a, b = start.clone(), start.clone()
        a.grad = torch.randn(shape)
        b.grad = a.grad.clone()
        peers.MuonAdamW([a], [], lr=0.02).step()  # CPU: float32
        torch.optim.Muon([b], lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw").step()
        ours, theirs = start - a, start - b
        rel = (ours - theirs).norm() / theirs.norm()
        assert 1e-5 < rel < 3e-2  # different rounding, same step
        x = peers.newton_schulz(a.grad, torch.float32)
        singular = torch.linalg.svdvals(x)
        assert x.dtype == torch.float32 and 0.5 < singular.min() and singular.max() < 1.5  # orthogonalised


def test_muon_adamw_part_is_torch_adamw():
    model = tiny_t5()
    hidden, rest = peers.muon_split(model)
    twin = copy.deepcopy(rest)
    opt = peers.MuonAdamW(hidden, rest, lr=1e-2)
    ref = torch.optim.AdamW(twin, lr=1e-2, betas=peers.ADAMW_BETAS, eps=1e-8, weight_decay=0.0)
    for t in range(3):
        _grads(model, t)
        for a, b in zip(rest, twin):
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(rest, twin):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert {g["algorithm"] for g in opt.param_groups} == {"muon", "adamw"}


def test_muon_rejects_non_matrices_and_unknown_lr_adjustment():
    with pytest.raises(ValueError, match="2-D"):
        peers.MuonAdamW([torch.zeros(3, requires_grad=True)], [], lr=1e-3)
    with pytest.raises(ValueError, match="adjust_lr_fn.*match_rms_adamw"):
        peers.MuonAdamW([torch.zeros(3, 3, requires_grad=True)], [], lr=1e-3, adjust_lr_fn="rms")
    with pytest.raises(ValueError, match="peer must be one of"):
        peers.build("lion", tiny_t5(), 1e-3)


def test_adam_mini_partitions_t5_by_head_neuron_and_token():
    model = tiny_t5(d_model=32, heads=4)  # d_kv 8 * 4 heads = d_model
    opt = peers.adam_mini(model, 1e-3)
    _grads(model, 0)
    opt.step()
    state = {n: opt.state[p] for n, p in model.named_parameters()}
    assert state["encoder.block.0.layer.0.SelfAttention.q.weight"]["vmean"].shape == (4, 1)  # one per head
    assert state["encoder.block.0.layer.0.SelfAttention.v.weight"]["vmean"].shape == (32, 1)  # per neuron
    assert state["decoder.block.0.layer.2.DenseReluDense.wi.weight"]["vmean"].shape == (64, 1)
    assert state["shared.weight"]["vmean"].shape == (model.config.vocab_size, 1)  # per token
    assert state["encoder.final_layer_norm.weight"]["vmean"].shape == ()  # one for the tensor
    assert "v" in state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # Adam ("bias")


@pytest.mark.parametrize("name", peers.PEERS)
def test_each_peer_follows_the_scheduled_learning_rate(name):
    """Two copies agree until the scheduler halves one's lr: that copy's next step is half as long
    (decoupled weight decay scales with lr too), and at lr 0 nothing moves."""
    a = tiny_t5()
    b = copy.deepcopy(a)
    opt_a, opt_b = peers.build(name, a, 3e-3), peers.build(name, b, 3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda t: 1.0 if t < 3 else (0.5 if t < 4 else 0.0))
    for t in range(5):
        _grads(a, t)
        _grads(b, t)
        before_a = [p.detach().clone() for p in a.parameters()]
        before_b = [p.detach().clone() for p in b.parameters()]
        opt_a.step()
        opt_b.step()
        sched.step()
        step_a = torch.cat([(p - q).flatten() for p, q in zip(a.parameters(), before_a)])
        step_b = torch.cat([(p - q).flatten() for p, q in zip(b.parameters(), before_b)])
        # parameters of size ~1 in float32: each coordinate's step is known to ~1e-7
        if t < 3:
            torch.testing.assert_close(step_b, step_a, rtol=1e-5, atol=1e-6)
        elif t == 3:
            torch.testing.assert_close(step_b, step_a / 2, rtol=1e-4, atol=1e-6)
            assert (step_b.norm() / step_a.norm()).item() == pytest.approx(0.5, rel=1e-3)
        else:
            assert step_a.abs().max() > 0 and step_b.abs().max() == 0


def test_nested_state_is_counted_in_state_bytes():
    class Nested(torch.optim.SGD):
        pass

    p = torch.zeros(10, requires_grad=True)
    opt = Nested([p], lr=1.0)
    opt.state[p] = {0: {"a": torch.zeros(10), "b": [torch.zeros(5, dtype=torch.float64)]}, "step": 3}
    assert proxy.optimizer_state_mb(opt) == (40 + 40) / 1e6


@pytest.mark.parametrize("name", ["muon", "soap", "adam_mini", "schedule_free_adamw", "adamw_b2_0.95"])
def test_each_peer_trains_the_proxy_task_through_the_trainer(name, tmp_path):
    """proxy.run with a peer: the Trainer steps the optimizer the peer names (built for the model, or the Trainer's
    own for schedule-free AdamW) and the eval loss falls; its state is counted."""
    tokenizer = proxy.load_tokenizer()
    data = proxy.tokenize_splits(proxy.load_debsum(), tokenizer, {"train": 48, "validation": 16})
    tiny = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4)
    r = proxy.run(name, 3e-3, max_steps=3, output_dir=tmp_path, data=data, tokenizer=tokenizer, rouge_size=0,
                  model_overrides=tiny, disable_tqdm=True, batch_size=16)
    curve = [p["eval_loss"] for p in r["eval_curve"]]
    assert r["optimizer"] == name and len(curve) == 4 and curve[-1] < curve[0]
    assert r["optimizer_state_mb"] > 0
