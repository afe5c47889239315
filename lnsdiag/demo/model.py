"""The demo model: a small Llama trained offline on the standard library's docstrings.

A random model shows nothing and many machines cannot reach the hub, so ``lnsdiag demo``
runs the diagnostics on its own model, through the same functions and the same loading path
(``load_model(directory)``) a user's checkpoint goes through.

Training it takes minutes on a CPU, so the default model and its LNS twin ship with the
package (``weights/``: float16 weights, tokenizer, config, training record and a SHA-256
manifest), written by ``python -m lnsdiag.demo export`` from this very recipe. They are
checked and copied into the cache as float32; ``lnsdiag demo --retrain`` trains them from
scratch instead, and ``python -m lnsdiag.demo compare`` shows the two agree.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..data.text import TextSource, stdlib_corpus
from ..data.windows import special_tokens_around
from ..errors import UserError
from ..interventions import lns, postln
from ..progress import SILENT, Progress
from ..runs import cache_dir, write_json
from .training import TrainLog, train_causal_lm

#: Bump when the demo's recipe changes, so stale cached models are not reused.
RECIPE_VERSION = 1

#: Where a demo model normalises: the paper's baseline, its fix, and the original Transformer.
NORMS: tuple[str, ...] = ("pre-ln", "lns", "post-ln")
#: New spec fields, left out of the cache key at these defaults so existing keys stay valid.
_KEY_DEFAULTS = {"norm": "pre-ln", "init": "default"}
#: Shipped demo models, one folder per cache entry (``demo_dir(spec).name``).
SHIPPED = Path(__file__).with_name("weights")
#: The shipped twins: the default spec with each of these norms.
SHIPPED_NORMS: tuple[str, ...] = ("pre-ln", "lns")
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
RECORD = "train_log.json"
RETRAIN_HINT = "run `lnsdiag demo --retrain` to train the model from scratch"


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines a demo model; its hash names the cache entry."""

    layers: int = 12
    hidden: int = 128
    heads: int = 4
    intermediate: int = 384
    vocab: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 250
    lr: float = 3e-3
    seed: int = 0
    norm: str = "pre-ln"  # pre-ln, lns (LayerNorm Scaling) or post-ln
    init: str = "default"  # default or scaled (depth-scaled output projections; see lns.initialize)

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if _KEY_DEFAULTS.get(k, object()) != v}
        blob = json.dumps({**fields, "recipe": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        suffix = "" if self.norm == "pre-ln" else f"-{self.norm}"
        suffix += "" if self.init == "default" else f"-{self.init}-init"
        return f"demo-llama-{self.layers}L-{self.hidden}d{suffix}"

    def with_(self, **changes: Any) -> DemoSpec:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with Llama-style special tokens (BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=1 << 20,
    )


def demo_config(spec: DemoSpec, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=max(spec.seq_len, 512), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def corpus_stream(tokenizer: Any, split: str = "train") -> torch.Tensor:
    """The stdlib-docstring corpus as one token stream (documents joined by blank lines)."""
    texts = stdlib_corpus(split).texts
    return torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)


def text_digest(text: TextSource) -> str:
    """A short hash of a training text, so models trained on other text get other folders."""
    digest = hashlib.sha256()
    for doc in text.texts:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:12]


def demo_dir(spec: DemoSpec, text: TextSource | None = None) -> Path:
    key = spec.key() if text is None else hashlib.sha256(f"{spec.key()}:{text_digest(text)}".encode()).hexdigest()[:12]
    return cache_dir() / "demo" / f"{spec.name}-{key}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shipped_dir(spec: DemoSpec, text: TextSource | None = None) -> Path | None:
    """The shipped folder of this spec's model, if the package has one (stdlib corpus only)."""
    if text is not None:
        return None
    folder = SHIPPED / demo_dir(spec).name
    return folder if folder.is_dir() else None


def verify_shipped(folder: Path) -> dict[str, Any]:
    """The folder's manifest, once every file it lists matches its SHA-256, else a UserError."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the shipped demo weights' manifest {manifest_path} "
                        f"({type(exc).__name__}): reinstall lnsdiag or {RETRAIN_HINT}") from exc
    if WEIGHTS not in files or RECORD not in files or any(Path(n).name != n for n in files):
        raise UserError(f"the shipped demo weights' manifest {manifest_path} is malformed: "
                        f"reinstall lnsdiag or {RETRAIN_HINT}")
    for name, expected in files.items():
        path = folder / name
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise UserError(f"cannot read the shipped demo weights file {path} ({exc.strerror or type(exc).__name__})"
                            f": reinstall lnsdiag or {RETRAIN_HINT}") from exc
        if actual != expected:
            raise UserError(f"the shipped demo weights file {path} does not match its SHA-256 in {MANIFEST} "
                            f"(corrupt or modified): reinstall lnsdiag or {RETRAIN_HINT}")
    return manifest


def _put_in_place(staging: Path, target: Path) -> None:
    """Replace ``target`` by the finished ``staging`` folder: a model folder is whole or absent."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def materialise(folder: Path, manifest: dict[str, Any], target: Path) -> dict[str, Any]:
    """Copy a verified shipped model into the cache, its float16 weights as float32.

    The cache then holds exactly what the shipped weights give (upcasting is exact), in the
    format a freshly trained model has, so every later step loads it the same way.
    """
    from safetensors.torch import load_file, save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for name in manifest["files"]:
            if name != WEIGHTS:
                shutil.copyfile(folder / name, staging / name)
        tensors = load_file(folder / WEIGHTS)
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, staging / WEIGHTS, metadata={"format": "pt"})
        record = json.loads((staging / RECORD).read_text(encoding="utf-8"))
        record["weights"] = {"source": "shipped", "stored_dtype": manifest.get("stored_dtype", "float16"),
                             "dtype": "float32", "shipped_sha256": manifest["files"][WEIGHTS],
                             "sha256": file_sha256(staging / WEIGHTS), "trained_on": manifest.get("trained_on", {})}
        write_json(staging / RECORD, record)
        _put_in_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _check_cached(target: Path, record: dict[str, Any]) -> None:
    """A cached model whose weights no longer match the SHA-256 written with them is a UserError."""
    expected = (record.get("weights") or {}).get("sha256")
    if not expected:
        return  # cached before checksums were recorded
    path = target / WEIGHTS
    try:
        ok = file_sha256(path) == expected
    except OSError:
        ok = False
    if not ok:
        raise UserError(f"the cached demo model file {path} is missing or does not match the SHA-256 recorded "
                        f"with it: {RETRAIN_HINT}, or delete {target} to rebuild it")


def prepare_model(model: Any, spec: DemoSpec) -> Any:
    """Give a freshly built model the spec's init and norm placement (before training)."""
    if spec.norm not in NORMS:
        raise UserError(f"unknown norm {spec.norm!r} (use {', '.join(NORMS)})")
    lns.initialize(model, spec.init)
    if spec.norm == "lns":
        lns.apply_lns(model)
    elif spec.norm == "post-ln":
        postln.apply_post_ln(model)
    return model


def ensure_demo_model(
    spec: DemoSpec,
    *,
    fresh: bool = False,
    device: str | torch.device = "cpu",
    progress: Progress = SILENT,
    text: TextSource | None = None,
    shipped: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Return the cached demo model's directory, filling the cache first if needed.

    A cached model is checked against the SHA-256 recorded with it. Missing, it comes from the
    package's shipped weights when there are some for this spec (``shipped``; checked against
    their manifest), else it is trained; ``fresh`` always trains. ``text`` trains on other text
    than the stdlib docstrings (tokenizer and model). The spec's ``norm`` and ``init`` are
    applied to the freshly built model, so twins that differ only there start from the same
    weights and see the same batches.

    Training writes to a temporary folder that is renamed when complete, so an
    interrupted run never leaves a half-trained model in the cache. ``progress`` sees a
    phase for the tokenizer, then ``training <name>`` with one unit per step.
    """
    target = demo_dir(spec, text)
    record_path = target / RECORD
    if target.is_dir() and record_path.is_file() and not fresh:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        _check_cached(target, record)
        return target, record
    source = shipped_dir(spec, text) if shipped and not fresh else None
    if source is not None:  # a fraction of a second: no progress phase
        return target, materialise(source, verify_shipped(source), target)
    texts = text.texts if text is not None else stdlib_corpus("train").texts
    corpus = text.name if text is not None else "stdlib-docstrings[train]"
    progress.phase(f"training a tokenizer on {'the stdlib docstrings' if text is None else corpus}")
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(texts, spec.vocab)
    if text is None:
        stream = corpus_stream(tokenizer, "train")
    else:
        stream = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)
    prefix, _ = special_tokens_around(tokenizer)
    if len(stream) <= spec.seq_len - len(prefix):
        raise UserError(f"the training text has {len(stream)} tokens, too few for --seq-len {spec.seq_len}: "
                        "give more text or a shorter sequence length")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(demo_config(spec, tokenizer), dtype=torch.float32)
    prepare_model(model, spec)
    model.to(device)
    progress.phase(f"training {spec.name}", total=spec.steps)
    log: TrainLog = train_causal_lm(
        model, stream, steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
        lr=spec.lr, seed=spec.seed, prefix=prefix, progress=progress,
    )
    record = {"spec": asdict(spec), "recipe": RECIPE_VERSION, "corpus": corpus,
              "corpus_tokens": len(stream), "corpus_digest": text_digest(TextSource(corpus, texts)),
              "python": platform.python_version(),
              "train": {**log.as_dict(), "losses": [round(x, 4) for x in log.losses]}}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.cpu()
        if lns.is_lns(model):
            lns.fold_lns(model)  # trained with the hooks, written with the scales in the norm weights: any runtime
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        weights = staging / WEIGHTS  # absent if a large model was saved in shards: then nothing to check
        record["weights"] = {"source": "trained", "dtype": "float32",
                             "sha256": file_sha256(weights) if weights.is_file() else None,
                             "device": str(device), "torch_threads": torch.get_num_threads()}
        write_json(staging / RECORD, record)
        _put_in_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, record


# --- shipping the default models (maintainers) ---------------------------------------------

def write_shipped(model_dir: Path, dest: Path) -> dict[str, Any]:
    """Write a trained cached model as a shipped folder: its files, the weights as float16, a manifest.

    Refuses weights that float16 cannot hold (non-finite after the cast), and records the
    largest relative rounding change so the manifest says what the cast cost.
    """
    from safetensors.torch import load_file, save_file

    record = json.loads((model_dir / RECORD).read_text(encoding="utf-8"))
    if (record.get("weights") or {}).get("source") != "trained":
        raise UserError(f"{model_dir} was not trained here (its record says {record.get('weights')}): "
                        "export only freshly trained models")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        names = sorted(p.name for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        worst = 0.0
        for name in names:
            if name == WEIGHTS:
                tensors = load_file(model_dir / WEIGHTS)
                half = {k: v.half().contiguous() for k, v in tensors.items()}
                for k, v in half.items():
                    if not torch.isfinite(v).all():
                        raise UserError(f"{k} of {model_dir} does not fit in float16")
                    scale = tensors[k].abs().max().clamp_min(1e-12)
                    worst = max(worst, float((v.float() - tensors[k]).abs().max() / scale))
                save_file(half, staging / WEIGHTS, metadata={"format": "pt"})
            else:
                shutil.copyfile(model_dir / name, staging / name)
        import tokenizers
        import transformers

        manifest = {
            "name": model_dir.name, "spec": record["spec"], "recipe": record["recipe"],
            "stored_dtype": "float16", "dtype": "float32",
            "float16_max_rounding": worst,  # largest |float16 - float32| over each tensor's largest |weight|
            "command": "python -m lnsdiag.demo export",
            "trained_on": {"python": record.get("python"), "corpus": record["corpus"],
                           "corpus_tokens": record["corpus_tokens"], "corpus_digest": record.get("corpus_digest"),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "tokenizers": tokenizers.__version__, "platform": platform.platform(),
                           "device": record["weights"].get("device"),
                           "torch_threads": record["weights"].get("torch_threads")},
            "files": {name: file_sha256(staging / name) for name in names},
        }
        write_json(staging / MANIFEST, manifest)
        for path in staging.iterdir():  # package data: readable by all, like the rest of the package
            path.chmod(0o644)
        staging.chmod(0o755)
        _put_in_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def export_shipped(spec: DemoSpec | None = None, dest: Path = SHIPPED, *, progress: Progress = SILENT) -> list[Path]:
    """Train the shipped twins from scratch with the recipe and write them into ``dest``."""
    spec = spec or DemoSpec()
    written = []
    for norm in SHIPPED_NORMS:
        path, _ = ensure_demo_model(spec.with_(norm=norm), fresh=True, progress=progress)
        written.append(dest / path.name)
        write_shipped(path, written[-1])
    return written
