"""Start-up self-check: every kernel in use against the float32 reference, and a golden decode.

Silent garbage from one kernel path (a GPU, a batch size, a shape the tiles do not divide) is
the quantized-serving bug users keep finding for the server (vLLM #10656). Before /ready turns
200 this module proves, on the weights actually loaded:

1. Kernels. Every QuantLinear runs its own backend on random inputs with M rows for each M in
   `SelfCheckConfig.ms` (1 = the GEMV path, 16 = the GEMM path) and on the real activations of
   the golden prompt (M = its length), and the output is compared with `quant.kernels.reference`
   (float32 dequantisation + float32 matmul). Two numbers per run, both against the reference's
   Frobenius norm: the relative error ||y - ref|| / ||ref|| and the worst output column's error
   relative to a typical column (catches one bad tile among thousands of good ones). Thresholds
   are per activation dtype (`RTOL`), looser on real activations, whose outliers legitimately
   inflate the error of kernels that quantise activations.
2. Golden greedy decode. A fixed prompt is decoded greedily through the engine (paged KV cache,
   served kernels, CUDA graphs where on), with the served logprobs of every prompt position and
   every generated token. Then the model runs once more, teacher-forced over the same tokens,
   with every QuantLinear computing the float32 reference instead of its kernel (checks 1 ride
   along in that pass, so each layer is dequantised once). At each position the served top
   tokens' logprobs must agree with the reference's within `GOLDEN_NATS[dtype]`, and each token
   the served path picked must be within the same margin of the reference's best token.

Why the golden comparison cannot false-alarm on fp16 rounding: it never asks for identical
tokens. A near tie that rounding flips gives a picked token whose reference logprob is within
the rounding error of the best one (far below the margin), and teacher forcing scores every
position on the same prefix, so one flip never cascades into a diverged continuation. Garbage
does not hide under the margin: measured on the default model, correct paths stay within 0.93
nats, broken ones are 19-30 nats off (numbers in bench/NOTES.md).

A failure refuses to serve: one log line per failing layer (name, backend, error, threshold) and
a SelfCheckError (the CLI exits non-zero). With `allow_fallback`, failing layers move to the
reference backend `torch` (when only the golden decode fails, all layers do), the decode is run
again, and the report's `fallbacks` feeds /v1/models and quantserve_kernel_fallback_layers.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from quant import kernels
from quant.linear import QuantLinear
from server.engine.sequence import SamplingParams
from server.models.attention import CausalAttention
from server.selfcheck_report import GoldenResult, LayerRun, SelfCheckConfig, SelfCheckError, SelfCheckReport

log = logging.getLogger("quantserve.selfcheck")

REFERENCE_BACKEND = "torch"
# Relative error (Frobenius) allowed on random inputs, per activation dtype. Measured on the
# default model: 0 for dense fp32, 3e-3 for dense bf16, <= 8e-3 for the CPU kernel, which
# quantises activations to int8 by design. The bugs this exists for give far more: a uniform 5%
# scale error 5e-2, zeros off by one 5e-2 .. 1, permuted outputs ~1.4, NaN/overflow inf.
RTOL = {torch.float32: 2e-2, torch.float16: 2e-2, torch.bfloat16: 4e-2}
# Real activations have outlier channels that inflate int8-activation error (up to 4e-2 measured
# on SmolLM2's v_proj with the CPU kernel); their check is there for NaN, overflow and garbage.
REAL_ACTIVATION_FACTOR = 4.0
# Logprob agreement (nats) of the golden decode per dtype. Measured worst case of a correct path
# on the default model: 0.56 (dense bf16), 0.72 / 0.93 (CPU int8-activation kernel, fp32 / bf16);
# broken paths: 19-30 (permuted outputs at small M, zeros off by one).
GOLDEN_NATS = {torch.float32: 3.0, torch.float16: 3.0, torch.bfloat16: 4.0}
GOLDEN_PROMPT = ("The quick brown fox jumps over the lazy dog. The capital of France is Paris, "
                 "and the capital of Italy is")
MIN_PROMPT_TOKENS = 17  # the prefill must take the GEMM path (M >= 16)
TOP_LOGPROBS = 5


# --------------------------------------------------------------------------- entry point

def run_self_check(engine, tokenizer, config: SelfCheckConfig = SelfCheckConfig()) -> SelfCheckReport:
    """Check `engine`'s model (an LLMEngine, not yet serving) as described in the module docstring.

    Returns the report (status passed / fallback / skipped); raises SelfCheckError when the model
    disagrees with the reference and fallback is off or does not help. Layers moved to the
    reference backend stay there (their `backend` attribute says so).
    """
    if not config.enabled:
        log.warning("self-check skipped (--skip-self-check): kernel output is not verified")
        return SelfCheckReport(status="skipped")
    t0 = time.perf_counter()
    model = engine.model
    dtype = model.dtype
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    tolerance = GOLDEN_NATS.get(dtype, GOLDEN_NATS[torch.float16])
    prompt = golden_prompt(tokenizer, model.config.vocab_size,
                           engine.limits.max_model_len - config.golden_tokens)

    served, served_error = _served_decode(engine, prompt, config.golden_tokens)
    ids = prompt + (served.output_ids[:-1] if served is not None else [])
    runs: list[LayerRun] = []
    ref_logprobs = _reference_pass(model, ids, layers, config, runs)
    golden = compare_golden(served, served_error, prompt, ref_logprobs, tolerance)
    failures = [r for r in runs if not r.ok]
    report = SelfCheckReport(status="passed", dtype=str(dtype).replace("torch.", ""),
                             layers_checked=len(layers), ms=tuple(config.ms) + (len(ids),),
                             max_rel_error=_worst_by_backend(runs), failures=failures,
                             golden=golden)
    for r in failures[:20]:
        log.error("self-check: %s", r.describe())
    if len(failures) > 20:
        log.error("self-check: ... and %d more failing runs", len(failures) - 20)
    if not golden.ok:
        log.error("self-check: %s", golden.describe())

    if failures or not golden.ok:
        if not config.allow_fallback:
            first = failures[0].describe() if failures else golden.describe()
            bad = len({r.layer for r in failures})
            raise SelfCheckError(
                f"self-check failed ({bad} of {len(layers)} layers disagree with the float32 "
                f"reference{'' if golden.ok else ', golden decode mismatch'}): {first}; refusing "
                f"to serve (--allow-fallback serves such layers on the reference path, "
                f"--skip-self-check skips the check)")
        report = _fall_back(engine, tokenizer, layers, failures, report, prompt, config, tolerance)
    report.seconds = time.perf_counter() - t0
    _log_summary(report)
    return report


def _fall_back(engine, tokenizer, layers, failures, report, prompt, config, tolerance):
    """Move the failing layers (all, if only the golden decode failed) to the reference backend,
    decode again and require the golden decode to agree now."""
    failing = {r.layer for r in failures}
    moved: dict[str, int] = {}
    for name, layer in layers:
        if layer.backend == REFERENCE_BACKEND or (failing and name not in failing):
            continue
        moved[layer.backend or "unprepared"] = moved.get(layer.backend or "unprepared", 0) + 1
        kernels.prepare(layer, REFERENCE_BACKEND)
    for backend, count in sorted(moved.items()):
        log.warning("self-check: --allow-fallback: %d layers moved from backend '%s' to the "
                    "reference backend '%s' (slower, correct)", count, backend, REFERENCE_BACKEND)
    runner = getattr(engine, "runner", None)
    if moved and getattr(runner, "graphs", None) is not None:
        runner.graphs = None  # captured graphs would replay the old kernels
        log.warning("self-check: CUDA graphs turned off after the fallback")
    served, served_error = _served_decode(engine, prompt, config.golden_tokens)
    ids = prompt + (served.output_ids[:-1] if served is not None else [])
    ref_logprobs = _reference_pass(engine.model, ids, layers, config, runs=None)
    golden = compare_golden(served, served_error, prompt, ref_logprobs, tolerance)
    if not golden.ok:
        raise SelfCheckError(f"self-check failed even with the reference backend on "
                             f"{sum(moved.values())} layers: {golden.describe()}; the mismatch is "
                             f"outside the quantized kernels; refusing to serve")
    report.status = "fallback"
    report.golden = golden
    report.fallbacks = moved
    return report


def _log_summary(report: SelfCheckReport) -> None:
    worst = ", ".join(f"{b} {e:.2g}" for b, e in sorted(report.max_rel_error.items())) or "none"
    log.info("self-check %s in %.2fs: %d layers x M=%s in %s, worst relative error %s; %s",
             report.status, report.seconds, report.layers_checked, list(report.ms), report.dtype,
             worst, report.golden.describe() if report.golden else "no golden decode")


# --------------------------------------------------------------------------- pieces

def golden_prompt(tokenizer, vocab_size: int, max_len: int) -> list[int]:
    """GOLDEN_PROMPT's token ids (at least MIN_PROMPT_TOKENS, repeated if need be, ids < vocab)."""
    ids: list[int] = []
    try:
        ids = [int(t) for t in tokenizer.encode(GOLDEN_PROMPT)]
    except Exception as exc:  # a tokenizer that cannot encode plain text: fixed ids instead
        log.debug("self-check: tokenizer failed (%s); using fixed ids", exc)
    ids = [t for t in ids if 0 <= t < vocab_size] or [(7 * i + 3) % vocab_size for i in range(24)]
    while len(ids) < MIN_PROMPT_TOKENS:
        ids = ids + ids
    return ids[:max(2, max_len)]


def _served_decode(engine, prompt: list[int], num_tokens: int):
    """Greedy decode through the engine's own step loop; (finished Sequence, None) or (seq?, error).

    The prefix cache is off for this request so serving starts with nothing computed by a path
    that may yet fail the check."""
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True,
                            logprobs=TOP_LOGPROBS, prompt_logprobs=TOP_LOGPROBS)
    allocator = engine.allocator
    caching = allocator.enable_prefix_caching
    allocator.enable_prefix_caching = False
    rid = f"self-check-{time.monotonic_ns()}"
    seq = None
    try:
        seq = engine.add_request(rid, prompt, params)
        while engine.has_unfinished():
            engine.step()
        if len(seq.output_ids) != num_tokens:
            return seq, f"the engine produced {len(seq.output_ids)} of {num_tokens} tokens"
        return seq, None
    except Exception as exc:  # a kernel that crashes is a failed check, not a crash at start-up
        try:
            engine.abort_request(rid)
        except Exception:  # the step died half-way; the request is gone either way
            log.debug("self-check: abort after a failed step also failed", exc_info=True)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        allocator.enable_prefix_caching = caching


@torch.inference_mode()
def _reference_pass(model, ids: list[int], layers, config: SelfCheckConfig,
                    runs: list[LayerRun] | None) -> torch.Tensor:
    """Teacher-forced forward over `ids` (no KV cache) with every QuantLinear returning the float32
    reference; returns log-softmax float32 [len(ids), V] (row j scores token j + 1).

    With `runs` given, each layer's own backend is also run, on the real activations reaching the
    layer and on random inputs of M = config.ms rows, and measured against the same reference."""
    device = model.device
    gen = torch.Generator(device=device).manual_seed(config.seed)
    patched = []
    for name, layer in layers:
        layer.forward = _checked_forward(name, layer, config, gen, runs)
        patched.append(layer)
    try:
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        positions = torch.arange(len(ids), device=device)
        hidden = model(input_ids, positions, CausalAttention([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden), dim=-1)
    finally:
        for layer in patched:
            del layer.forward


def _checked_forward(name: str, layer: QuantLinear, config: SelfCheckConfig,
                     gen: torch.Generator, runs: list[LayerRun] | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = layer.dequantize(torch.float32)  # [N, K], once per layer
        bias = None if layer.bias is None else layer.bias.float()
        ref = torch.nn.functional.linear(x.float(), w, bias)
        if runs is not None and layer.backend != REFERENCE_BACKEND:
            threshold = RTOL.get(x.dtype, max(RTOL.values()))
            runs.append(_run_backend(name, layer, x, ref, "prompt",
                                     threshold * REAL_ACTIVATION_FACTOR))
            for m in config.ms:
                xr = torch.randn(m, layer.in_features, generator=gen, device=x.device,
                                 dtype=torch.float32).to(x.dtype)
                ref_r = torch.nn.functional.linear(xr.float(), w, bias)
                runs.append(_run_backend(name, layer, xr, ref_r, "random", threshold))
        return ref.to(x.dtype)
    return forward


def _run_backend(name: str, layer: QuantLinear, x: torch.Tensor, ref: torch.Tensor, source: str,
                 threshold: float) -> LayerRun:
    m = int(x.numel() // layer.in_features)
    backend = layer.backend or "unprepared"
    try:
        y = kernels.apply(layer, x)
    except Exception as exc:
        return LayerRun(name, backend, m, source, math.inf, math.inf, threshold,
                        error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    rel, col = relative_errors(y, ref)
    return LayerRun(name, backend, m, source, rel, col, threshold)


def relative_errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||y - ref|| / ||ref||, max over columns n of ||y[:, n] - ref[:, n]|| / (||ref|| / sqrt(N)))
    for y, ref [..., N]; inf when y has a NaN or an Inf."""
    n = ref.shape[-1]
    y = y.float().reshape(-1, n)
    ref = ref.float().reshape(-1, n)
    if not bool(torch.isfinite(y).all()):
        return math.inf, math.inf
    diff = y - ref
    ref_norm = float(ref.norm()) or 1e-30
    rel = float(diff.norm()) / ref_norm
    col = float(diff.norm(dim=0).max()) / (ref_norm / math.sqrt(n))
    return rel, col


def compare_golden(seq, error: str | None, prompt: list[int], ref_logprobs: torch.Tensor,
                   tolerance: float) -> GoldenResult:
    """Served logprobs (prompt positions and generated tokens) against the reference's."""
    result = GoldenResult(prompt_tokens=len(prompt), generated_tokens=0, positions=0,
                          max_logprob_diff=0.0, max_greedy_gap=0.0, argmax_agreement=0.0,
                          tolerance=tolerance, error=error)
    if seq is None or error is not None:
        return result
    ref = ref_logprobs.float().cpu()
    rows: list[tuple[int, object, bool]] = []  # (reference row, served record, picked by served)
    for target, rec in enumerate(seq.prompt_logprobs or []):
        if rec is not None:
            rows.append((target - 1, rec, False))
    for i, rec in enumerate(seq.output_logprobs):
        rows.append((len(prompt) + i - 1, rec, True))
    agree = 0
    for row, rec, picked in rows:
        if row >= ref.shape[0]:
            continue
        lp = ref[row]
        served = {rec.token_id: rec.logprob, **{t: v for t, v in rec.top}}
        for token, value in served.items():
            if not math.isfinite(value):
                result.max_logprob_diff = math.inf
                continue
            result.max_logprob_diff = max(result.max_logprob_diff, abs(value - float(lp[token])))
        if picked:
            best = int(lp.argmax())
            result.max_greedy_gap = max(result.max_greedy_gap, float(lp[best] - lp[rec.token_id]))
            agree += int(best == rec.token_id)
        result.positions += 1
    result.generated_tokens = len(seq.output_logprobs)
    result.argmax_agreement = agree / max(1, result.generated_tokens)
    return result


def _worst_by_backend(runs: list[LayerRun]) -> dict[str, float]:
    worst: dict[str, float] = {}
    for r in runs:
        worst[r.backend] = max(worst.get(r.backend, 0.0), r.rel_error)
    return worst
