"""Quantized loading (``--quantize 8bit|4bit``): models larger than the GPU's memory.

The backend is bitsandbytes through transformers' ``BitsAndBytesConfig``: ``8bit`` is LLM.int8()
(int8 weights; activations quantized per token, outlier columns above 6.0 kept in float16),
``4bit`` is NF4 (4-bit weights in blocks of 64, dequantized to ``--dtype`` for each matmul).
Both run on CUDA and, with bitsandbytes >= 0.46.1, on the CPU (measured with torch 2.13 CPU and
bitsandbytes 0.46.1, 0.47.0, 0.48.2, 0.50.2). Only the blocks' linear layers are quantized:
embeddings, norms and the LM head stay in ``--dtype``.

Removal hooks, both engines, the angular and variance measurements work on a quantized model
as on any other (they never touch weights). Writing a checkpoint does not: a checkpoint holds
full-precision weights, which a quantized model no longer has (:func:`refuse_save`).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
from typing import Any

import torch

from ..errors import OptionError, UserError
from .patch import Patches

#: The modes ``--quantize`` takes.
MODES = ("8bit", "4bit")
#: Other spellings of them.
_SPELLINGS = {"8bit": "8bit", "int8": "8bit", "8-bit": "8bit", "4bit": "4bit", "nf4": "4bit", "4-bit": "4bit"}
#: The first bitsandbytes transformers accepts; on the CPU it runs 8-bit and 4-bit layers already.
MIN_BITSANDBYTES = "0.46.1"
INSTALL_HINT = f"pip install 'bitsandbytes>={MIN_BITSANDBYTES}' (or pip install 'lnsdiag[quantize]')"
#: Device types lnsdiag runs a quantized model on.
DEVICES = ("cpu", "cuda")
#: NF4 quantizes weights in blocks of this many values (bitsandbytes' default).
BLOCKSIZE_4BIT = 64


def parse_quantize(value: str | None) -> str | None:
    """``8bit``, ``4bit`` (or None: not quantized) from what the user typed; an OptionError naming
    the closest mode otherwise."""
    if value is None:
        return None
    key = str(value).strip().lower()
    if key in ("", "none", "no", "off"):
        return None
    if key in _SPELLINGS:
        return _SPELLINGS[key]
    ratio = {mode: difflib.SequenceMatcher(None, key, mode).ratio() for mode in MODES}
    close = [mode for mode in MODES if ratio[mode] >= 0.6 and ratio[mode] == max(ratio.values())]  # ties: both
    hint = f"did you mean {' or '.join(close)}?" if close else "use 8bit or 4bit (bitsandbytes)"
    raise OptionError("{quantize} {value} is not a quantization mode; " + hint, value=repr(str(value)))


def backend_version() -> str | None:
    """The installed bitsandbytes' version, or None when it is not installed."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_quantize(mode: str | None, device: str | None = "auto") -> None:
    """Refuse, before any output or slow work, a quantized load that cannot run here: bitsandbytes
    missing or too old (one line saying what to install), or a device it does not run on."""
    if mode is None:
        return
    kind = _device_type(device)
    if kind is not None and kind not in DEVICES:
        raise OptionError("{quantize} " + mode + " runs on cpu and cuda, not on {value} (bitsandbytes)",
                          value=device)
    installed = backend_version()
    if installed is None:
        raise UserError(f"--quantize {mode} needs bitsandbytes, which is not installed: {INSTALL_HINT}")
    from packaging.version import InvalidVersion, Version

    try:
        old = Version(installed) < Version(MIN_BITSANDBYTES)
    except InvalidVersion:  # a local build: let transformers judge it
        old = False
    if old:
        raise UserError(f"--quantize {mode} needs bitsandbytes >= {MIN_BITSANDBYTES} (installed: {installed}): "
                        f"{INSTALL_HINT.replace('pip install', 'pip install -U', 1)}")


def _device_type(device: str | None) -> str | None:
    if device in (None, "", "auto"):
        return None  # auto is cuda or cpu
    try:
        return torch.device(device).type
    except RuntimeError:
        return None  # pick_device names a malformed device


def quantization_config(mode: str, dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``mode``; 4-bit computes in ``dtype``."""
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ValueError(f"unknown quantization mode {mode!r}")


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs that an 8-bit layer casts its input to float16 on every call of every
    layer: expected (LLM.int8() quantizes activations from float16), and it would flood the output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


_NOTICE_FILTER = _DropCastNotice()
#: Name of the patches :func:`prepare` keeps on a model (:meth:`~lnsdiag.model.patch.Patches.keep_on`).
PATCHES = "int8_inputs"


class _Flatten:
    """Forward pre-hook of an 8-bit layer: an input of more than 3 dimensions (DeepSeek's MLA feeds
    ``kv_b_proj`` a [batch, 1, seq, rank] tensor) reshaped to 3, which bitsandbytes' LLM.int8() takes
    (it quantizes row by row over all leading dimensions alike; its CPU path fails on 4)."""

    def __init__(self) -> None:
        self.shape: torch.Size | None = None

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() <= 3:
            self.shape = None
            return None
        self.shape = x.shape[:-1]
        return (x.reshape(-1, x.shape[-2], x.shape[-1]), *args[1:])


class _Unflatten:
    """Forward hook pairing :class:`_Flatten`: the output back in the input's leading dimensions."""

    def __init__(self, flatten: _Flatten) -> None:
        self.flatten = flatten

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        shape, self.flatten.shape = self.flatten.shape, None
        return output if shape is None else output.reshape(*shape, output.shape[-1])


def prepare(model: torch.nn.Module) -> None:
    """Ready a model transformers loaded quantized: the per-call cast notice silenced; 8-bit layers
    given inputs of at most 3 dimensions (:class:`_Flatten`); 4-bit layers bitsandbytes could not
    repack for its CPU kernel kept on its portable path (its AVX512-BF16 repacking needs in_features
    a multiple of the block size and out_features of 32, and crashes on the first forward otherwise)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _NOTICE_FILTER not in logger.filters:
        logger.addFilter(_NOTICE_FILTER)
    patches = Patches()
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            flatten = _Flatten()
            patches.pre_hook(module, flatten)
            patches.hook(module, _Unflatten(flatten))
    if len(patches):
        patches.keep_on(model, PATCHES)
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(module.weight, "blocksize", None) or BLOCKSIZE_4BIT
        in_features, out_features = getattr(module, "in_features", 0), getattr(module, "out_features", 0)
        if in_features % blocksize or out_features % 32 or in_features < blocksize:
            module.support_avx512bf16_for_cpu = False


def quantized_mode(model: Any) -> str | None:
    """How ``model``'s weights are quantized (``8bit``, ``4bit``, another method's name), or None:
    from transformers' own record, so a checkpoint saved quantized counts too."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return "quantized" if getattr(model, "is_quantized", False) else None
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    if get("load_in_8bit", False):
        return "8bit"
    if get("load_in_4bit", False):
        return "4bit"
    method = get("quant_method", None)
    return str(getattr(method, "value", method) or "quantized")


def describe(model: Any) -> dict[str, Any] | None:
    """What meta.json records of a quantized model (backend, version, mode, layout), else None."""
    mode = quantized_mode(model)
    if mode is None:
        return None
    record: dict[str, Any] = {"mode": mode}
    if mode in MODES:
        record.update(backend="bitsandbytes", version=backend_version())
        config = model.hf_quantizer.quantization_config if getattr(model, "hf_quantizer", None) else None
        if mode == "8bit":
            record["int8_threshold"] = getattr(config, "llm_int8_threshold", None)
        else:
            record["quant_type"] = getattr(config, "bnb_4bit_quant_type", None)
            dtype = getattr(config, "bnb_4bit_compute_dtype", None)
            record["compute_dtype"] = str(dtype).replace("torch.", "") if dtype is not None else None
    return record


def settings(mode: str | None) -> dict[str, Any]:
    """The settings-fingerprint entry of a model loaded quantized (``{"quantize": "8bit"}``), nothing for a
    full-precision one: result folders made before quantized loading existed stay resumable."""
    return {"quantize": mode} if mode else {}


def parameter_count(model: torch.nn.Module) -> int:
    """The model's parameters as weights, not storage: a 4-bit tensor packs two values per byte."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += int(torch.Size(state.shape).numel()) if state is not None and param.dtype == torch.uint8 \
            else param.numel()
    return total


def refuse_save(mode: str | None, what: str = "a checkpoint",
                hint: str = "load the model without quantization to write one") -> None:
    """One line refusing to write a checkpoint of a quantized model: a checkpoint holds full-precision
    weights, which a quantized model no longer has (writing the 8-bit or 4-bit tensors would make a
    checkpoint only bitsandbytes reads, of a model other than the one named)."""
    if mode is None:
        return
    raise UserError(f"{what} needs full-precision weights, and the model is loaded quantized ({mode}): {hint}")
