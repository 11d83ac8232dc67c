"""The engine's GPU paths on a real GPU: paged prefill + decode against a full forward, CUDA-graph
decode against eager, the decode step's kernels chained (the Triton kernels alone: test_fused_kernels,
test_triton_attention)."""

import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams
from server.models.attention import CausalAttention, decode_reference
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM
from tests.conftest import tiny_hf_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_gpu_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_hf(tiny_hf_config(head_dim=64, hidden_size=256,
                                                                num_attention_heads=4,
                                                                num_key_value_heads=2)))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.5)
    return model.to("cuda", torch.float16).eval()


def _prompts(n):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(5, 49000, (int(x),), generator=g).tolist()
            for x in torch.randint(3, 90, (n,), generator=g)]


def test_cuda_graph_decode_equals_eager_and_batched_equals_solo(tiny_gpu_model):
    ps = _prompts(12)
    params = SamplingParams(max_tokens=40, temperature=0)
    eager = LLMEngine(tiny_gpu_model, EngineConfig(kv_cache_gb=0.05, enforce_eager=True,
                                                   max_model_len=512), [])
    graphs = LLMEngine(tiny_gpu_model, EngineConfig(kv_cache_gb=0.05, max_model_len=512,
                                                    max_num_batched_tokens=128), [])
    assert graphs.limits.cuda_graph_batch_sizes
    a = eager.generate(ps, params)
    b = graphs.generate(ps, params)
    assert a == b
    solo = [graphs.generate([p], params)[0] for p in ps[:4]]
    assert solo == b[:4]
    assert graphs.allocator.num_free == graphs.allocator.num_blocks


def test_batches_above_128_replay_graphs_and_match_eager(tiny_gpu_model):
    """150 sequences: every decode step replays a graph (the ladder ends at max_num_seqs), and the
    tokens equal the eager engine's. Long prompts stop first, so later steps' block tables are
    narrower than earlier ones' (the graphs only rewrite the columns in use)."""
    ps = _prompts(150)
    order = sorted(range(len(ps)), key=lambda i: -len(ps[i]))
    budgets = {i: 2 + 10 * rank // len(ps) for rank, i in enumerate(order)}
    cfg = dict(kv_cache_gb=0.1, max_model_len=512, max_num_seqs=150, max_num_batched_tokens=4096)
    eager = LLMEngine(tiny_gpu_model, EngineConfig(enforce_eager=True, **cfg), [])
    graphs = LLMEngine(tiny_gpu_model, EngineConfig(**cfg), [])
    assert graphs.limits.cuda_graph_batch_sizes[-2:] == (128, 150)
    replayed, eager_decode = [], []
    run, execute = graphs.runner.graphs.run, graphs.runner.execute

    def counting_run(items):
        replayed.append(len(items))
        return run(items)

    def counting_execute(batch):
        before = len(replayed)
        out = execute(batch)
        if batch.is_decode_only and len(replayed) == before:
            eager_decode.append(len(batch.seqs))
        return out

    graphs.runner.graphs.run, graphs.runner.execute = counting_run, counting_execute
    outs = []
    for eng in (eager, graphs):
        seqs = [eng.add_request(f"r{i}", p, SamplingParams(max_tokens=budgets[i], temperature=0))
                for i, p in enumerate(ps)]
        while eng.has_unfinished():
            eng.step()
        outs.append([s.output_ids for s in seqs])
    assert outs[0] == outs[1]
    assert max(replayed) > 128 and not eager_decode, (max(replayed), eager_decode)


@torch.no_grad()
def test_gpu_engine_logprobs_follow_full_forward(tiny_gpu_model):
    p = _prompts(1)[0]
    eng = LLMEngine(tiny_gpu_model, EngineConfig(kv_cache_gb=0.05, max_model_len=512), [])
    seq = eng.add_request("x", p, SamplingParams(max_tokens=6, temperature=0, logprobs=0))
    while eng.has_unfinished():
        eng.step()
    ids = p + seq.output_ids[:-1]
    hidden = tiny_gpu_model(torch.tensor(ids, device="cuda"), torch.arange(len(ids), device="cuda"),
                            CausalAttention([len(ids)]))
    want = torch.log_softmax(tiny_gpu_model.compute_logits(hidden[len(p) - 1:]), -1)
    got = torch.tensor([r.logprob for r in seq.output_logprobs], device="cuda")
    chosen = want.gather(1, torch.tensor(seq.output_ids, device="cuda")[:, None])[:, 0]
    torch.testing.assert_close(got, chosen, atol=2e-2, rtol=0)


@pytest.mark.parametrize("sums", [False, True])
def test_quantized_linears_after_triton_kernels_read_finished_inputs(sums):
    """rms_norm -> GEMV -> silu_mul -> GEMV (qkv) -> rotary -> KV-cache write -> decode attention ->
    GEMV -> residual rms_norm as in a decode step, eagerly and in a graph. On Hopper every link is a
    programmatic dependent launch: the GEMVs and the Triton kernels start while the kernel before
    them finishes, so each must read its input (and write the cache) only after its wait. 64 tokens:
    the wgmma GEMM. sums: the linears leave their fp32 sums where the backend does (sums_op: the GEMV
    up to 16 tokens as rows, the Hopper wgmma GEMM up to 128 as [column][token slot], here at 64 and
    100 tokens) and the Triton kernel after each converts and zeroes them, so the shared sums
    buffer is zero again after every step, and the q/k/v sums kernels store k and v in the cache
    themselves (KVSlots)."""
    from quant import kernels
    from quant.backends import cuda as cuda_backend
    from quant.sums import Sums
    from server.models import fused, pdl, qkv_reader
    from server.models.triton_attention import max_partitions, paged_decode_attention, write_kv
    from tests.kernels.layers import eager_then_graph, random_layer

    nh, nkv, d = 32, 8, 128
    layers = [random_layer(*kn, 4, 128, seed=i, device="cuda") for i, kn in
              enumerate([(4096, 2 * 4096), (4096, (nh + 2 * nkv) * d), (4096, 4096)])]
    for layer in layers:
        assert layer.prepare("cuda") == "cuda"
    g = torch.Generator(device="cuda").manual_seed(3)
    w = torch.rand(4096, device="cuda", dtype=torch.float16, generator=g) + 0.5
    kc = torch.randn(512, 16, nkv, d, device="cuda", dtype=torch.float16, generator=g)
    vc = torch.randn_like(kc)
    buffer = cuda_backend.workspace(torch.device("cuda")).sums
    if torch.cuda.get_device_capability()[0] >= 9:
        assert pdl.triton_pdl(w), "Hopper, but the Triton kernels do not take part in PDL"

    def linear(layer, x):
        y = layer.forward_sums(x) if sums else layer(x)
        assert isinstance(y, Sums) == (sums and cuda_backend.sums_op(x.shape[0], layer.kernel_state, x.device)
                                       is not None)
        return y

    for m in (1, 4, 8, 16, 64, 100) if sums else (1, 4, 64):
        tables = torch.arange(m * 4, device="cuda", dtype=torch.int32).view(m, 4)  # own blocks
        ctx = torch.full((m,), 50, device="cuda", dtype=torch.int32)
        slots = (tables[:, 49 // 16] * 16 + 49 % 16).long()  # each sequence's new token, position 49
        freqs = 49.0 / 10000 ** (torch.arange(0, d, 2, device="cuda") / d)
        emb = torch.cat([freqs, freqs])[None, None, :].expand(m, 1, d)
        cos, sin = emb.cos().half(), emb.sin().half()

        def run(x):
            h, _ = fused.rms_norm(x, w, 1e-5)
            a = fused.silu_mul(linear(layers[0], h))
            kv = qkv_reader.KVSlots(kc, vc, slots) if sums else None  # the sums kernel also stores k, v
            qkv = linear(layers[1], a)
            q, k, v = qkv_reader.qkv_rotary(qkv, nh, nkv, d, cos, sin, kv)
            # both sums kernels (rows, and the Hopper GEMM's [column][slot]) store k and v
            assert kv is None or kv.stored == isinstance(qkv, Sums)
            if kv is None or not kv.stored:
                write_kv(k, v, kc, vc, slots)
            att = paged_decode_attention(q, kc, vc, tables, ctx, max_partitions(512))
            out, res = fused.rms_norm(linear(layers[2], att.view(m, 4096)), w, 1e-5, x)
            return h, a, q, k, v, att, out, res

        def close(got, want, tol=2e-3):
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            assert err < tol, f"m={m} sums={sums}: rel err {err:.2e}"

        def check(x, outs):
            h, a, q, k, v, att, out, res = outs
            torch.testing.assert_close(h, fused.rms_norm_torch(x, w, 1e-5)[0], atol=2e-2, rtol=1e-2)
            gate, up = kernels.reference(layers[0], h).double().chunk(2, dim=-1)
            close(a, torch.nn.functional.silu(gate) * up, 4e-3)
            want_q, want_k, want_v = kernels.reference(layers[1], a).split([nh * d, nkv * d, nkv * d], dim=-1)
            want_q, want_k = fused.rotary_torch(want_q.view(m, nh, d), want_k.view(m, nkv, d),
                                                cos.float(), sin.float())
            close(q, want_q)
            close(k, want_k)
            close(v, want_v.view(m, nkv, d))
            assert torch.equal(kc.view(-1, nkv, d)[slots], k) and torch.equal(vc.view(-1, nkv, d)[slots], v)
            close(att, decode_reference(q.double(), kc.double(), vc.double(), tables, ctx))
            y = kernels.reference(layers[2], att.view(m, 4096))
            close(res, y + x.float())
            torch.testing.assert_close(out, fused.rms_norm_torch(res, w, 1e-5)[0], atol=2e-2, rtol=1e-2)
            assert not buffer.pending and not buffer.data.any(), "a reader left sums behind"

        def fresh():
            return torch.randn(m, 4096, device="cuda", dtype=torch.float16, generator=g)

        eager_then_graph(run, check, fresh(), fresh)


class _CountingGraph:
    """A captured decode graph that counts its replays per batch size."""

    def __init__(self, graph, size, calls):
        self.graph, self.size, self.calls = graph, size, calls

    def replay(self):
        self.calls[self.size] += 1
        self.graph.replay()


def test_decode_bench_times_the_batch_graph_on_the_gpu(tiny_gpu_model):
    """bench/decode.py's gpu_step_ms replays the graph of the batch's size (and no other) after the
    timed steps, on a live engine, which still finishes cleanly; an eager engine has no such time."""
    from collections import Counter

    from bench.decode import time_decode

    eng = LLMEngine(tiny_gpu_model, EngineConfig(kv_cache_gb=0.05, max_model_len=512), [])
    graphs = eng.runner.graphs
    size = next(s for s in graphs.batch_sizes if s >= 3)
    assert size != graphs.batch_sizes[-1]
    calls = Counter()
    for s, g in list(graphs.graphs.items()):
        graphs.graphs[s] = _CountingGraph(g, s, calls)
    r = time_decode(eng, 3, steps=4)
    assert r["gpu_step_ms"] is not None and 0 < r["gpu_step_ms"] < r["step_ms"] * 10
    assert set(calls) == {size} and calls[size] >= 200 + 10 + 4
    assert not eng.requests and eng.allocator.num_free == eng.allocator.num_blocks
    eager = LLMEngine(tiny_gpu_model, EngineConfig(kv_cache_gb=0.05, max_model_len=512, enforce_eager=True), [])
    assert time_decode(eager, 2, steps=2)["gpu_step_ms"] is None
