"""Resolve what the user typed (alias, hub id, local directory) and load model + tokenizer.

Everything downstream takes a :class:`LoadedModel`, so a notebook can also wrap a model it
built itself (``LoadedModel.wrap``) and use every diagnostic on it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..distributed import replica_gpus, replica_max_memory, world
from ..errors import UserError
from ..interventions.lns import restore_lns
from ..interventions.postln import restore_post_ln
from ..interventions.pruned import restore_removed_units
from . import quantize as quant
from .families import ALIASES, ENCODER_ONLY_ARCHITECTURES, ENCODER_ONLY_MODEL_TYPES

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

# The hub's own rule, minus the corner cases: ORG/NAME or NAME, letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")


@dataclass
class LoadedModel:
    """A model ready for diagnostics, with how it was obtained (for meta.json)."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    revision: str | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    device_map: str | None = None
    trust_remote_code: bool = False
    quantize: str | None = None  #: ``8bit``/``4bit`` (bitsandbytes), another method's name, or None

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, name: str = "model") -> LoadedModel:
        """Wrap a model built in memory (tests, notebooks, the demo)."""
        prepare_tokenizer(tokenizer)
        model.eval()
        param = next(model.parameters())
        return cls(model, tokenizer, name=name, source=name, dtype=param.dtype, device=param.device,
                   quantize=quant.quantized_mode(model))

    @property
    def slug(self) -> str:
        if Path(self.source).is_dir():
            return model_slug(self.source)
        return model_slug(ALIASES.get(self.name, self.name))

    @property
    def num_parameters(self) -> int:
        return quant.parameter_count(self.model)

    def weights_identity(self) -> str | None:
        """What pins the weights: the hub commit, or name/size/mtime of a local directory's
        weight files (a checkpoint retrained in place is a different model), else None."""
        commit = getattr(self.model.config, "_commit_hash", None)
        path = Path(self.source)
        if path.is_dir():
            import hashlib

            digest = hashlib.sha256()
            for f in sorted(path.glob("*")):
                if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json") and f.is_file():
                    stat = f.stat()
                    digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            return "local:" + digest.hexdigest()[:16]
        return f"commit:{commit}" if commit else None

    def describe(self) -> dict[str, Any]:
        """How this model was produced, for the JSON record of a run."""
        cfg = self.model.config
        return {
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "commit": getattr(cfg, "_commit_hash", None),
            "model_type": getattr(cfg, "model_type", None),
            "architecture": type(self.model).__name__,
            "parameters": self.num_parameters,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "device_map": self.device_map,
            "trust_remote_code": self.trust_remote_code,
            "quantize": self.quantize,
            "quantization": quant.describe(self.model),
        }


def model_slug(name: str) -> str:
    """A folder name for a model: hub ids as the HF cache spells them, local dirs by name."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        name = path.resolve().name
    slug = name.strip("/").replace("/", "--")
    return re.sub(r"[^\w.\-]+", "_", slug) or "model"


def resolve_model(name: str) -> tuple[str, bool]:
    """Map what the user typed to ``(source, is_local)``; raise UserError if it cannot be one.

    As in ``from_pretrained``, an existing local directory wins over everything else, aliases
    included (``./llama`` beats the ``llama`` alias; :func:`shadowed_alias` says so).
    """
    if not name or not name.strip():
        raise UserError("no model given: pass a hub id, a local directory or an alias")
    name = name.strip()
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            alias = ALIASES.get(name.lower())
            hint = f" (for the alias, pass the hub id {alias})" if alias else ""
            raise UserError(f"{name} is a directory but holds no config.json: not a model{hint}")
        return str(path.resolve()), True
    if name.lower() in ALIASES:
        return ALIASES[name.lower()], False
    if path.exists():
        raise UserError(f"{name} is a file, not a model directory or hub id")
    if name.startswith(("/", ".", "~")) or name.endswith("/") or os.sep + os.sep in name:
        raise UserError(f"no such model directory: {name}")
    if not _HUB_ID.match(name) or "--" in name or ".." in name:
        raise UserError(
            f"{name!r} is neither a local directory nor a valid Hugging Face model id "
            "(expected ORG/NAME, e.g. meta-llama/Llama-2-7b-hf, or an alias: lnsdiag models)"
        )
    return name, False


#: Files one of which a tokenizer saved with ``save_pretrained`` (any kind) leaves in its folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")


def check_tokenizer_files(source: str | Path) -> None:
    """A local model folder must hold its tokenizer: refused before the weights load, naming the
    folder and what it lacks (transformers' own error is several lines about backends)."""
    folder = Path(source)
    if not folder.is_dir():
        return
    if any((folder / name).is_file() for name in _TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return
    raise UserError(f"cannot load the tokenizer of {folder}: the folder holds no tokenizer files (tokenizer.json, "
                    "tokenizer_config.json, tokenizer.model, vocab.json + merges.txt or vocab.txt); copy them from the "
                    "model it was made from (tokenizer.save_pretrained(folder))")


def _whole(exc: BaseException, limit: int = 400) -> str:
    """An exception's whole message on one line (a tokenizer's error lists its alternatives over several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shadowed_alias(name: str) -> str | None:
    """A line saying so when a local directory named like an alias (or hub id) is used instead."""
    source, is_local = resolve_model(name)
    if not is_local:
        return None
    alias = ALIASES.get(name.strip().lower())
    if alias:
        return f"using the local directory {source}, not the alias {name.strip()} ({alias})"
    if _HUB_ID.match(name.strip()) and "/" in name.strip() and not name.strip().startswith("."):
        return f"using the local directory {source}, not the hub model {name.strip()}"
    return None


_HUB_STATE: dict[str, bool] = {}


def hub_offline() -> bool:
    """Whether to work from the local cache only: HF_HUB_OFFLINE is set, or the hub is unreachable.

    An unreachable hub is found with one quick connection attempt (2 s), then the offline
    switches of huggingface_hub, transformers and datasets are set, so nothing waits through
    the libraries' retries (~25 s) before falling back to cached files.
    """
    if "offline" in _HUB_STATE:
        return _HUB_STATE["offline"]
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not flag:
        import socket
        from urllib.parse import urlparse

        endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        try:
            socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=2).close()
        except OSError:
            flag = True
            go_offline()
    _HUB_STATE["offline"] = flag
    return flag


def go_offline() -> None:
    """Set every library's offline switch (env vars, and constants already imported)."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    _HUB_STATE["offline"] = True


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU; under a launcher (torchrun),
    ``auto`` and ``cuda`` are this rank's own GPU, ``cuda:LOCAL_RANK``."""
    here = world()
    if device in ("auto", "", None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and here.parallel and torch.cuda.is_available():
        device = f"cuda:{here.local_rank % torch.cuda.device_count()}"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present")
    return dev


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that has it (float16 otherwise), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", "", None):
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[dtype.lower()]
    except KeyError as exc:
        raise UserError(f"unknown dtype {dtype!r} (use auto, bfloat16, float16 or float32)") from exc


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (batches need one; attention masks make its id moot)."""
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token_id = 0
    return tokenizer


def restore_norms(model: Any) -> bool:
    """Re-install what a checkpoint's config records beyond its weights: its norm scheme (LayerNorm
    Scaling or Post-LN, which plain transformers would compute wrongly) and the sub-layers it was
    pruned of (``lnsdiag_removed_units``: skipped, which plain transformers computes as zeros at full
    cost; :mod:`~lnsdiag.interventions.pruned`). True if it records a norm scheme. Needed after a plain
    ``from_pretrained``; ``load_model`` does it. LayerNorm Scaling recorded as folded (the checkpoints
    lnsdiag writes) is already in the norm weights: nothing is installed, so it is never applied twice;
    an older, unfolded record gets its hooks."""
    post = restore_post_ln(model)
    restore_removed_units(model)
    return restore_lns(model) or post


def _short(exc: BaseException) -> str:
    """The first meaningful line of an exception, for a one-line error."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _unreadable_weights(exc: BaseException) -> bool:
    """Whether loading failed because a weights file cannot be parsed (not because of our code)."""
    import pickle

    if type(exc).__module__.startswith("safetensors") or isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        key in text for key in ("PytorchStreamReader", "zip archive", "unexpected EOF", "invalid load key"))


def _is_encoder_only(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(ENCODER_ONLY_ARCHITECTURES) for a in archs):
        return True
    return getattr(config, "model_type", "") in ENCODER_ONLY_MODEL_TYPES


def load_model(
    name: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    gpus_per_replica: int = 1,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a checkpoint (hub id, alias or local directory) and its tokenizer, ready to run.

    Causal LMs load with their LM head; encoder-only models (BERT) with their MLM head.
    ``gpus_per_replica`` > 1 spreads the model over that many GPUs of this node, this rank's
    own (:func:`replica_placement`), for models larger than one GPU under a launcher.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    source, is_local = resolve_model(name)
    quantize = quant.parse_quantize(quantize)
    quant.check_quantize(quantize, device)
    placement: dict[str, Any] = {}
    if gpus_per_replica != 1:
        placement = replica_placement(gpus_per_replica, device_map)
        device = f"cuda:{min(placement['max_memory'])}"  # the replica's first GPU: its dtype and inputs
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    where = source if is_local else f"{source!r} from the Hugging Face hub"
    if is_local:
        check_tokenizer_files(source)  # before the weights, which may take minutes
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except ValueError as exc:
        msg = _short(exc)
        if "trust_remote_code" in msg:
            raise UserError(
                f"{source} needs its own code from the hub: rerun with --trust-remote-code "
                "if you trust it"
            ) from exc
        raise UserError(
            f"cannot read the config of {where}: {msg} (transformers "
            f"{transformers.__version__}; --trust-remote-code or a newer transformers may help)"
        ) from exc
    except (OSError, KeyError) as exc:
        hint = "" if is_local else (
            " (check the id and --revision, your network, HF_TOKEN for gated models, or HF_HUB_OFFLINE)"
        )
        raise UserError(f"cannot load {where}: {_short(exc)}{hint}") from exc

    auto_cls = AutoModelForMaskedLM if _is_encoder_only(config) else AutoModelForCausalLM
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype, **common}
    load_kwargs["device_map"] = device_map if device_map else {"": dev}
    load_kwargs.update(placement)
    if quantize:
        load_kwargs["quantization_config"] = quant.quantization_config(quantize, torch_dtype)
    try:
        model = auto_cls.from_pretrained(source, config=config, **load_kwargs)
    except ValueError as exc:
        if quantize:  # transformers' checks of a quantized load (e.g. 8-bit layers offloaded to the CPU)
            raise _quantized_load_failed(where, quantize, exc) from exc
        raise UserError(
            f"{type(config).__name__} ({getattr(config, 'model_type', '?')}) is not supported as "
            f"{auto_cls.__name__.replace('AutoModelFor', '')} by transformers "
            f"{transformers.__version__}: {_short(exc)}"
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot load the weights of {where}: {_short(exc)}") from exc
    except Exception as exc:
        if _unreadable_weights(exc):
            raise UserError(f"the weights of {where} are unreadable (corrupt or truncated file? re-download or "
                            f"re-save them): {type(exc).__name__}: {_short(exc)}") from exc
        if isinstance(exc, torch.OutOfMemoryError):
            hint = "--device-map auto" if quantize == "4bit" else "--quantize 4bit or --device-map auto"
            raise UserError(f"{where} does not fit in memory on {dev}: try --dtype bfloat16, {hint}") from exc
        if quantize and (isinstance(exc, ImportError) or "bitsandbytes" in str(exc)):
            raise _quantized_load_failed(where, quantize, exc) from exc
        raise
    model.eval()
    if quantize:
        quant.prepare(model)
    restore_norms(model)  # a checkpoint that records LayerNorm Scaling (unfolded) or Post-LN runs as trained

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception as exc:  # tokenizers' Rust errors are plain Exceptions; every one here is about the files
        raise UserError(f"cannot load the tokenizer of {where}: {_whole(exc)}") from exc
    prepare_tokenizer(tokenizer)

    first = next(model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        revision=revision,
        dtype=first.dtype,
        device=model.get_input_embeddings().weight.device if device_map else dev,
        device_map=device_map or placement.get("device_map"),
        trust_remote_code=trust_remote_code,
        quantize=quant.quantized_mode(model),
    )


def _quantized_load_failed(where: str, quantize: str, exc: BaseException) -> UserError:
    return UserError(f"cannot load {where} quantized ({quantize}, bitsandbytes {quant.backend_version()}): "
                     f"{_short(exc)}")


def replica_placement(per_replica: int, device_map: str | None = None, visible: int | None = None,
                      capacity: Any = None) -> dict[str, Any]:
    """``from_pretrained`` arguments that put this rank's replica on its ``per_replica`` GPUs
    (``LOCAL_RANK·K .. LOCAL_RANK·K + K − 1``): ``device_map="auto"`` bounded by ``max_memory``."""
    if per_replica < 1:
        raise UserError(f"--gpus-per-replica must be at least 1, not {per_replica}")
    if device_map:
        raise UserError(f"give --device-map {device_map} or --gpus-per-replica {per_replica}, not both")
    here = world()
    visible = torch.cuda.device_count() if visible is None else visible
    gpus = replica_gpus(here.local_rank, here.local_size, per_replica, visible)
    capacity = capacity or (lambda i: torch.cuda.get_device_properties(i).total_memory)
    return {"device_map": "auto", "max_memory": replica_max_memory(gpus, capacity)}


@dataclass(frozen=True)
class ModelOptions:
    """How to get a model: what every model command takes (``--revision``, ``--dtype``, ...).

    Checked when built (a malformed id or missing directory fails before any output or slow
    work); :meth:`load` loads it.
    """

    name: str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    layers_path: str | None = None
    gpus_per_replica: int = 1
    quantize: str | None = None

    def __post_init__(self) -> None:
        source, is_local = resolve_model(self.name)
        if is_local:
            check_tokenizer_files(source)
        pick_dtype(self.dtype)
        object.__setattr__(self, "quantize", quant.parse_quantize(self.quantize))  # nf4 -> 4bit
        quant.check_quantize(self.quantize, self.device)
        if self.gpus_per_replica < 1:
            raise UserError(f"--gpus-per-replica must be at least 1, not {self.gpus_per_replica}")
        if self.gpus_per_replica > 1 and self.device_map:
            raise UserError(f"give --device-map {self.device_map} or --gpus-per-replica {self.gpus_per_replica}, "
                            "not both")

    @property
    def is_local(self) -> bool:
        return resolve_model(self.name)[1]

    @property
    def slug(self) -> str:
        return model_slug(self.name)

    def load(self) -> LoadedModel:
        return load_model(self.name, revision=self.revision, dtype=self.dtype, device=self.device,
                          device_map=self.device_map, trust_remote_code=self.trust_remote_code,
                          gpus_per_replica=self.gpus_per_replica, quantize=self.quantize)
