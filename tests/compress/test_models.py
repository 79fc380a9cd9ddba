"""Tests for tensornets.models (offline loading, cache, text slices; compress.models re-exports it) and
compress.evaluation.

Fast tests replace the GGUF conversion with a tiny Llama so the cache logic runs in
milliseconds; tests marked ``slow`` use the real SmolLM2 / MiniLM weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import compress.models
import tensornets.models as models
from compress.evaluation import perplexity
from tensornets.models import (
    default_cache_dir,
    load_minilm,
    load_smollm2,
    pydoc_text,
    token_slices,
)


# --------------------------------------------------------------------------- helpers


class PositionTokenizer:
    """Maps a text of n characters to ids 0..n//4-1, so an id is its stream position."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": list(range(len(text) // 4))}


def _tiny_llama_and_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(31)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return LlamaForCausalLM(config).eval(), PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture
def fake_gguf(monkeypatch):
    """Replace the ~25 s GGUF conversion by a tiny model; ``calls`` counts conversions."""
    calls = []

    def convert(gguf_path):
        calls.append(gguf_path)
        return _tiny_llama_and_tokenizer()

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


# --------------------------------------------------------------------------- cache logic (fast)


def test_cache_round_trip_is_bitwise(tmp_path, fake_gguf):
    cache = tmp_path / "smol"
    first, tok1 = load_smollm2(cache_dir=cache)
    second, tok2 = load_smollm2(cache_dir=cache)
    assert len(fake_gguf) == 1, "second load must come from the cache"
    assert (cache / "model.safetensors").is_file()
    assert not list(cache.glob("*.bin")) and not list(cache.glob("*.pt")), "no pickle in the cache"
    assert _leftovers(tmp_path) == []
    assert not first.training and not second.training
    _assert_same_weights(first, second)
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert tok1("w1 w2 w3")["input_ids"] == tok2("w1 w2 w3")["input_ids"]


def test_cache_dtype(tmp_path, fake_gguf):
    # the converting (first) call returns the model every later call loads: the rotary frequencies stay float32 (a
    # bfloat16 inv_freq changed the first CLI run's numbers and adapter)
    first, _ = load_smollm2(cache_dir=tmp_path / "smol", dtype=torch.bfloat16)
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}
    later, _ = load_smollm2(cache_dir=tmp_path / "smol", dtype=torch.bfloat16)
    assert len(fake_gguf) == 1
    _assert_same_weights(first, later)
    first_buffers, later_buffers = dict(first.named_buffers()), dict(later.named_buffers())
    assert first_buffers.keys() == later_buffers.keys() and first_buffers
    assert all(b.dtype == later_buffers[n].dtype and torch.equal(b, later_buffers[n]) for n, b in first_buffers.items())
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, later(ids).logits)


def test_unwritable_cache_keeps_the_float32_rotary_frequencies(tmp_path, fake_gguf):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="TENSORNETS_CACHE"):
        model, _ = load_smollm2(cache_dir=blocker / "smol", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_bf16_load_converts_tensor_by_tensor_to_what_from_pretrained_gives(tmp_path, fake_gguf):
    """The low-memory bfloat16 load of the float32 cache equals ``from_pretrained(cache, dtype=bf16)`` bitwise: weights,
    tied head, rotary buffers and logits; a truncated cache file is refused."""
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "smol"
    load_smollm2(cache_dir=cache)  # writes the float32 cache
    model, _ = load_smollm2(cache_dir=cache, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.bfloat16, local_files_only=True).eval()
    _assert_same_weights(model, ref)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    buffers = dict(ref.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)

    data = (cache / "model.safetensors").read_bytes()
    (cache / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="is truncated at tensor"):
        models._load_converted(cache, torch.bfloat16)


@pytest.mark.parametrize("damage", ["no_manifest", "other_source"])
def test_broken_or_stale_cache_is_rebuilt(tmp_path, fake_gguf, damage):
    cache = tmp_path / "smol"
    load_smollm2(cache_dir=cache)
    if damage == "no_manifest":  # as if a non-atomic writer had been interrupted
        (cache / models._MANIFEST).unlink()
        (cache / "model.safetensors").write_bytes(b"truncated")
    else:  # cache built from another package version
        (cache / models._MANIFEST).write_text('{"format": 1, "source_bytes": 1}')
    model, _ = load_smollm2(cache_dir=cache)
    assert len(fake_gguf) == 2
    reloaded, _ = load_smollm2(cache_dir=cache)
    assert len(fake_gguf) == 2
    _assert_same_weights(model, reloaded)
    assert _leftovers(tmp_path) == []


def test_interrupted_write_leaves_no_cache(tmp_path, monkeypatch):
    model, tokenizer = _tiny_llama_and_tokenizer()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", fail)
    monkeypatch.setattr(models, "_convert_gguf", lambda path: (model, tokenizer))
    cache = tmp_path / "smol"
    with pytest.raises(KeyboardInterrupt):
        load_smollm2(cache_dir=cache)
    assert not cache.exists()
    assert _leftovers(tmp_path) == []


def test_concurrent_first_loads_convert_once(tmp_path, monkeypatch):
    """A second loader that finds no cache while the first converts waits and reads the first one's cache."""
    import threading

    calls, second_started = [], threading.Event()

    def slow_convert(gguf_path):
        calls.append(gguf_path)
        second_started.wait(timeout=60)
        # Without the lock the second loader, started meanwhile, would find no cache and convert too.
        threading.Event().wait(0.5)
        return _tiny_llama_and_tokenizer()

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    cache = tmp_path / "smol"
    results = {}

    def load(name, started=None):
        if started is not None:
            started.set()
        results[name] = load_smollm2(cache_dir=cache)

    first = threading.Thread(target=load, args=("first",))
    first.start()
    while not calls:  # the first loader is converting
        threading.Event().wait(0.01)
    second = threading.Thread(target=load, args=("second", second_started))
    second.start()
    first.join(timeout=120)
    second.join(timeout=120)
    assert len(calls) == 1
    _assert_same_weights(results["first"][0], results["second"][0])
    assert _leftovers(tmp_path) == []


def test_unwritable_cache_warns_and_still_loads(tmp_path, fake_gguf):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="TENSORNETS_CACHE"):
        model, _ = load_smollm2(cache_dir=blocker / "smol")
    assert isinstance(model, nn.Module) and not model.training


def test_smollm2_directory_converts_once_without_loading(tmp_path, fake_gguf):
    from tensornets.models import smollm2_directory

    cache = tmp_path / "smol"
    assert smollm2_directory(cache_dir=cache) == cache
    assert smollm2_directory(cache_dir=cache) == cache and len(fake_gguf) == 1
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    load_smollm2(cache_dir=cache)  # the same cache: no second conversion
    assert len(fake_gguf) == 1
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):  # a directory that cannot be written is no directory to hand out
        smollm2_directory(cache_dir=blocker / "smol")
    assert len(fake_gguf) == 1  # refused before converting
    with pytest.raises(ValueError, match="cache_dir"):
        smollm2_directory(cache_dir=models._package_dir(models._SMOLLM2_PACKAGE, models._SMOLLM2_DIST))


def test_cache_next_to_gguf_is_refused():
    gguf_dir = models._package_dir(models._SMOLLM2_PACKAGE, models._SMOLLM2_DIST)
    with pytest.raises(ValueError, match="cache_dir"):
        load_smollm2(cache_dir=gguf_dir)
    assert not (gguf_dir / "config.json").exists()


@pytest.mark.parametrize("dtype", [torch.int64, "float32", None])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        load_smollm2(dtype=dtype)


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORNETS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("TENSORNETS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "tensornets" / "smollm2-135m"


# --------------------------------------------------------------------------- text slices (fast)


def test_pydoc_text_is_deterministic_and_large():
    text = pydoc_text()
    assert text == pydoc_text()
    assert len(text) > 100_000


def test_slices_shapes_disjoint_deterministic():
    tok = PositionTokenizer()
    calib, held_out = token_slices(tok, calib_tokens=1024, eval_tokens=768, seq_len=256)
    assert len(calib) == 4 and len(held_out) == 3
    for batch in calib + held_out:
        assert batch.shape == (1, 256) and batch.dtype == torch.long
    calib_ids = torch.cat(calib, dim=1).flatten()
    eval_ids = torch.cat(held_out, dim=1).flatten()
    # Position ids: calibration is the stream start, windows are consecutive, no overlap.
    assert torch.equal(calib_ids, torch.arange(1024))
    assert torch.equal(eval_ids, torch.arange(eval_ids[0], eval_ids[0] + 768))
    assert set(calib_ids.tolist()).isdisjoint(eval_ids.tolist())
    again_calib, again_eval = token_slices(tok, calib_tokens=1024, eval_tokens=768, seq_len=256)
    assert all(torch.equal(a, b) for a, b in zip(calib + held_out, again_calib + again_eval))
    # The evaluation slice must not move when the calibration size changes.
    _, other_eval = token_slices(tok, calib_tokens=0, eval_tokens=768, seq_len=256)
    assert all(torch.equal(a, b) for a, b in zip(held_out, other_eval))


def test_slices_max_sizes():
    tok = PositionTokenizer()
    n = len(pydoc_text()) // 4
    seq = 2
    calib, held_out = token_slices(tok, (n // 2) // seq * seq, (n - n // 2) // seq * seq, seq)
    assert set(torch.cat(calib).flatten().tolist()).isdisjoint(torch.cat(held_out).flatten().tolist())
    assert token_slices(tok, 0, 0, 8) == ([], [])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(calib_tokens=512, eval_tokens=512, seq_len=1), "seq_len"),
        (dict(calib_tokens=512, eval_tokens=512, seq_len=0), "seq_len"),
        (dict(calib_tokens=512, eval_tokens=512, seq_len=256.0), "seq_len"),
        (dict(calib_tokens=-256, eval_tokens=512, seq_len=256), "calib_tokens"),
        (dict(calib_tokens=500, eval_tokens=512, seq_len=256), "calib_tokens=500 is not a multiple"),
        (dict(calib_tokens=0, eval_tokens=250, seq_len=100), "eval_tokens=250 is not a multiple"),
        (dict(calib_tokens=512, eval_tokens=True, seq_len=256), "eval_tokens"),
        (dict(calib_tokens=256 * 10**5, eval_tokens=512, seq_len=256), "calib_tokens=25600000 exceeds"),
        (dict(calib_tokens=512, eval_tokens=256 * 10**5, seq_len=256), "eval_tokens=25600000 exceeds"),
    ],
)
def test_slices_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_slices(PositionTokenizer(), **kwargs)


# --------------------------------------------------------------------------- perplexity (fast)


class UniformLM(nn.Module):
    """Equal logits everywhere: the perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=None):
        class Out:
            pass

        out = Out()
        out.logits = self.scale * torch.ones(*input_ids.shape, self.vocab)
        return out


def test_perplexity_uniform_model_equals_vocab():
    model = UniformLM(vocab=50).train()
    batches = [torch.randint(0, 50, (1, 16)), torch.randint(0, 50, (3, 5)), torch.randint(0, 50, (7,))]
    # rel=1e-6: the log-softmax runs in float32.
    assert perplexity(model, batches) == pytest.approx(50.0, rel=1e-6)
    assert perplexity(model, torch.randint(0, 50, (4, 9))) == pytest.approx(50.0, rel=1e-6)
    assert model.training, "perplexity must restore the model's mode"


def test_perplexity_pools_tokens_not_batches():
    model, _ = _tiny_llama_and_tokenizer()
    torch.manual_seed(1)
    short, long = torch.randint(0, 32, (1, 3)), torch.randint(0, 32, (1, 40))
    nll_short, nll_long = math.log(perplexity(model, [short])), math.log(perplexity(model, [long]))
    pooled = math.log(perplexity(model, [short, long]))
    assert pooled == pytest.approx((2 * nll_short + 39 * nll_long) / 41, rel=1e-6)


@pytest.mark.parametrize(
    "batches",
    [[], [torch.zeros(1, 1, dtype=torch.long)], [torch.zeros(1, 4)], [[1, 2, 3]], [torch.zeros(1, 1, 4, dtype=torch.long)]],
)
def test_perplexity_bad_batches(batches):
    with pytest.raises(ValueError, match="batches"):
        perplexity(UniformLM(8), batches)


# --------------------------------------------------------------------------- real models (slow)


@pytest.mark.slow
def test_smollm2_gguf_conversion_matches_cache(tmp_path, smollm2, no_network):
    cached_model, cached_tok = smollm2
    converted, tok1 = load_smollm2(cache_dir=tmp_path / "smol")  # GGUF -> model, ~25 s
    reloaded, tok2 = load_smollm2(cache_dir=tmp_path / "smol")
    assert not converted.training and not reloaded.training
    assert not hasattr(reloaded.config, "quantization_config")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    _assert_same_weights(converted, reloaded)
    _assert_same_weights(converted, cached_model)  # the shared default cache is the same model
    ids = torch.tensor([cached_tok("def f(x):\n    return x + 1\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reloaded(ids).logits)
    sample = pydoc_text()[:5000]
    assert tok1(sample)["input_ids"] == tok2(sample)["input_ids"] == cached_tok(sample)["input_ids"]
    assert (tok1.bos_token, tok1.eos_token) == (tok2.bos_token, tok2.eos_token)
    assert _leftovers(tmp_path) == []
    gguf_dir = models._package_dir(models._SMOLLM2_PACKAGE, models._SMOLLM2_DIST)
    assert not (gguf_dir / "config.json").exists() and not (gguf_dir / "tokenizer.json").exists()


@pytest.mark.slow
def test_smollm2_slices_disjoint_and_deterministic(smollm2):
    _, tok = smollm2
    calib, held_out = token_slices(tok, calib_tokens=2048, eval_tokens=2048, seq_len=512)
    assert len(calib) == len(held_out) == 4
    assert all(b.shape == (1, 512) and b.dtype == torch.long for b in calib + held_out)
    again_calib, again_eval = token_slices(tok, calib_tokens=2048, eval_tokens=2048, seq_len=512)
    assert all(torch.equal(a, b) for a, b in zip(calib + held_out, again_calib + again_eval))
    n = len(tok(pydoc_text(), add_special_tokens=False, verbose=False)["input_ids"])
    assert n > 100_000
    # Disjoint by position: calibration ends before the stream's midpoint, where evaluation starts.
    assert 2048 <= n // 2
    with pytest.raises(ValueError, match="eval_tokens"):
        token_slices(tok, 0, (n - n // 2 + 512) // 512 * 512, 512)


@pytest.mark.slow
def test_smollm2_dense_perplexity_is_sane(smollm2):
    model, tok = smollm2
    _, held_out = token_slices(tok, calib_tokens=0, eval_tokens=512, seq_len=256)
    ppl = perplexity(model, held_out)
    assert math.isfinite(ppl) and 2.0 < ppl < 40.0
    assert perplexity(model, torch.cat(held_out)) == pytest.approx(ppl, rel=1e-5)
    # The model must know English-like docs far better than the same tokens in random order.
    g = torch.Generator().manual_seed(0)
    shuffled = [b[:, torch.randperm(b.shape[1], generator=g)] for b in held_out[:1]]
    assert perplexity(model, shuffled) > 5 * ppl
    assert not model.training


@pytest.mark.slow
def test_minilm_loads_offline(minilm, no_network):
    model, tok = minilm
    assert not model.training
    assert 20e6 < sum(p.numel() for p in model.parameters()) < 25e6
    enc = tok(["a tensor network", "low rank"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape == (2, enc["input_ids"].shape[1], model.config.hidden_size)
    assert torch.isfinite(hidden).all()
    again, _ = load_minilm()
    _assert_same_weights(model, again)


def test_compress_models_re_exports_the_loaders():
    for name in compress.models.__all__:
        assert getattr(compress.models, name) is getattr(models, name), name
