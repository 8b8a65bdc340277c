"""The kernels as PyTorch sees them: torch.compile traces a Qwen2.5 decoder layer and the loss head
through our ops without a graph break, and FakeTensorMode runs the whole model, forward and
backward, on exactly the ops an H100 would run, on a machine without a GPU."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from limo import kernels
from limo.kernels import dispatch
from limo.model.qwen2 import PRESETS, DecoderLayer, LMHead, ModelArgs, Qwen2, VarlenContext, rotary_cos_sin
from tests.conftest import rel_err
from tests.fake_gpu import fake_gpu


@pytest.fixture(autouse=True)
def auto_backends(monkeypatch):
    """The default choices (Triton; flash-attn or torch's varlen attention on the GPU path), restored after."""
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("ATTENTION_BACKEND", raising=False)
    setting, resolved, attention = dict(dispatch._setting), dict(dispatch._resolved), dict(dispatch._attention)
    kernels.set_backend("auto")
    dispatch._attention.clear()
    yield
    for saved, live in ((setting, dispatch._setting), (resolved, dispatch._resolved), (attention, dispatch._attention)):
        live.clear(), live.update(saved)


class Ops(TorchDispatchMode):
    """Counts every operator dispatched, by name (e.g. 'limo.rmsnorm')."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _build(make, dtype: torch.dtype = torch.bfloat16):
    """Modules made on the current default device in `dtype` (Module.to cannot convert fake parameters)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return make()
    finally:
        torch.set_default_dtype(previous)


def _graph_ops(explanation) -> list[str]:
    return [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]


def _fused_attention() -> str:
    return "flash_attn" if dispatch.attention_backend("cuda") == "flash" else "torch_attn._varlen_attn"


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "qwen2.5-32b"])
def test_decoder_layer_and_loss_head_trace_without_graph_breaks(preset):
    """The GPU path (fake tensors; nothing runs): our RMSNorm ops, the fused attention and the fused
    loss are single nodes of one graph each."""
    args = PRESETS[preset]
    T = 8192
    with fake_gpu() as device:
        with torch.device(device):
            layer = _build(lambda: DecoderLayer(args, 0))
            head = _build(lambda: LMHead(args.hidden_size, args.vocab_size))
        h = torch.empty(T, args.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
        cos, sin = rotary_cos_sin(torch.arange(T, device=device), args.head_dim, args.rope_theta, torch.bfloat16)
        ctx = VarlenContext(torch.tensor([0, 3000, T], dtype=torch.int32).to(device), 5192)
        block = torch._dynamo.explain(layer)(h, cos, sin, ctx)
        loss = torch._dynamo.explain(head)(h, torch.zeros(T, dtype=torch.long, device=device))
    assert (block.graph_count, block.graph_break_count, block.break_reasons) == (1, 0, [])
    assert (loss.graph_count, loss.graph_break_count, loss.break_reasons) == (1, 0, [])
    ops = _graph_ops(block)
    assert ops.count("limo.rmsnorm.default") == 1 and ops.count("limo.rmsnorm_residual.default") == 1
    assert sum(_fused_attention() in op for op in ops) == 1 and not any("varlen_attention_reference" in op for op in ops)
    assert _graph_ops(loss)[0] == "limo.linear_cross_entropy.default"


def test_compiled_block_and_head_match_eager_on_the_cpu_path():
    """torch.compile(fullgraph=True) through AOT autograd on the CPU path (the Triton ops in the
    interpreter, the reference attention as its op): loss and every gradient equal eager's."""
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=203, hidden_size=48, intermediate_size=100, num_layers=1, num_heads=6, num_kv_heads=2,
                     rope_theta=10_000.0)  # fmt: skip
    layer, head = DecoderLayer(args, 0), LMHead(48, 203)
    torch.nn.init.normal_(head.weight, std=0.1)
    torch.nn.init.uniform_(layer.post_attention_layernorm.weight, 0.5, 1.5)
    lengths = [5, 17, 15]
    cu = torch.tensor([0, 5, 22, 37], dtype=torch.int32)
    cos, sin = rotary_cos_sin(torch.cat([torch.arange(n) for n in lengths]), args.head_dim, args.rope_theta, torch.float32)
    labels = torch.randint(0, 203, (37,))
    labels[4] = -100
    h0 = torch.randn(37, 48)

    def step(layer, head):
        for p in (*layer.parameters(), *head.parameters()):
            p.grad = None
        h = h0.clone().requires_grad_()
        loss = head(layer(h, cos, sin, VarlenContext(cu, 17)), labels)
        loss.backward()
        return [loss.detach(), h.grad] + [p.grad.clone() for p in (*layer.parameters(), *head.parameters())]

    want = step(layer, head)
    got = step(torch.compile(layer, fullgraph=True, backend="aot_eager"), torch.compile(head, fullgraph=True, backend="aot_eager"))
    assert all(rel_err(g, w) < 1e-6 for g, w in zip(got, want))


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "qwen2.5-7b"])
def test_whole_model_forward_and_backward_on_fake_gpu_tensors(preset):
    """Qwen2.5's real shapes (two layers; 151,936 and 152,064 vocabularies, tied and untied heads)
    in bf16, 16k packed tokens, the summed loss and its backward: output shapes, and the operators
    dispatched are ours and the fused attention's, never the references'."""
    from dataclasses import replace

    args = replace(PRESETS[preset], num_layers=2)
    T = 16384
    with fake_gpu() as device:
        with torch.device(device):
            model = _build(lambda: Qwen2(args))
        ids = torch.zeros(T, dtype=torch.long, device=device)
        cu = torch.tensor([0, 4096, 12000, T], dtype=torch.int32).to(device)
        with Ops() as ops:
            loss = model(ids, cu_seqlens=cu, max_seqlen=7904, labels=ids)
            loss.backward()
        assert loss.shape == () and loss.dtype == torch.float32
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == torch.bfloat16, name
    seen = ops.seen
    assert seen["limo.rmsnorm"] == 3 and seen["limo.rmsnorm_residual"] == 2  # input norms and the final one; fused adds
    assert seen["limo.rmsnorm_backward"] == 5 and seen["limo.linear_cross_entropy"] == 1
    attention = [op for op in seen if op.startswith(_fused_attention().split(".")[0])]
    assert sum(seen[op] for op in attention) == 4  # two layers, forward and backward
    assert not any("reference" in op for op in seen)
