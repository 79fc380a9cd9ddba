"""User data for ``tensornets compress``: --calib-data / --eval-data files, BOS in every window, --model-path *.gguf.

The tokenizer here prepends ``<s>`` by default (tests/compress/tiny_hf.py), as Llama-style tokenizers do.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from tiny_hf import WORDS, bos_tokenizer, tiny_llama

from compress.evaluation import perplexity
from compress.models import load_gguf, special_tokens_added, token_slices
from compress.text_data import load_texts


def _words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


# --------------------------------------------------------------------------------------------- files
def test_text_jsonl_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first row", "id": 1}) + "\n"
                                      + json.dumps({"text": "", "id": 2}) + "\n"
                                      + json.dumps({"text": "third row", "id": 3}) + "\n")
    pq.write_table(pa.table({"body": ["parquet text"], "n": [1]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x,y\n")
    assert load_texts(tmp_path / "a.txt") == ["line one\nline two\n"]  # one document per text file, newlines kept
    assert load_texts(tmp_path / "b.jsonl") == ["first row", "third row"]  # empty rows dropped
    assert load_texts(tmp_path / "c.parquet") == ["parquet text"]  # the only string column
    assert load_texts(tmp_path) == ["line one\nline two\n", "first row", "third row", "parquet text"]


def test_files_of_one_type_are_read_together_and_mixed_columns_one_by_one(tmp_path, monkeypatch, capfd):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    calls = []
    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k["data_files"]) or load(*a, **k))
    documents = [_words(20, seed) + "\n\nsecond paragraph\n" for seed in range(12)]
    for i, text in enumerate(documents):
        (tmp_path / f"doc{i:02d}.txt").write_text(text)
    (tmp_path / "e1.jsonl").write_text(json.dumps({"text": "json one"}) + "\n" + json.dumps({"text": "json two"}) + "\n")
    (tmp_path / "e2.jsonl").write_text(json.dumps({"text": "json three"}) + "\n")
    assert load_texts(tmp_path) == documents + ["json one", "json two", "json three"]  # every file, in path order
    assert [len(files) for files in calls] == [12, 2]  # one load per run of one type

    # files whose columns differ: read one by one, each with its own text column, and datasets' error log silenced
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(pa.table({"text": ["a"]}), mixed / "a.parquet")
    pq.write_table(pa.table({"body": ["b"], "n": [1]}), mixed / "b.parquet")
    pq.write_table(pa.table({"text": ["c"], "title": ["t"]}), mixed / "c.parquet")
    capfd.readouterr()
    calls.clear()
    assert load_texts(mixed) == ["a", "b", "c"]
    assert [len(files) for files in calls] == [3, 1, 1, 1]
    assert "Failed to read" not in capfd.readouterr().err


@pytest.mark.parametrize("flag", ["--calib-data", "--eval-data"])
def test_data_without_text_names_the_flag(tmp_path, flag):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "two.jsonl").write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    (tmp_path / "data.csv").write_text("a\n")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "zero.jsonl").write_bytes(b"")
    (tmp_path / "zero.parquet").write_bytes(b"")
    for path, match in [("empty.txt", "holds no text"), ("zero.jsonl", "holds no text"), ("zero.parquet", "holds no text"), ("two.jsonl", "no text column"),
                        ("data.csv", "unsupported file type"), ("nothing", "holds no"), ("missing.txt", "no such")]:
        with pytest.raises(ValueError, match=match) as err:
            load_texts(tmp_path / path, flag=flag)
        assert str(err.value).startswith(flag), err.value


# --------------------------------------------------------------------------------------------- BOS windows
def test_special_tokens_added():
    assert special_tokens_added(bos_tokenizer()) == ([1], [])


def test_windows_keep_bos_and_read_consecutive_text():
    tok = bos_tokenizer()
    texts = [_words(300, 0), _words(300, 1)]
    calib, held_out = token_slices(tok, 4 * 16, 2 * 16, 16, calib_texts=texts)
    stream = tok(texts[0] + "\n\n" + texts[1], add_special_tokens=False)["input_ids"]
    assert len(calib) == 4 and all(w.shape == (1, 16) for w in calib + held_out)
    for i, window in enumerate(calib):
        assert window[0, 0] == 1  # BOS, as tok(text) gives
        assert window[0, 1:].tolist() == stream[15 * i: 15 * (i + 1)]
    assert all(w[0, 0] == 1 for w in held_out)
    # evaluation keeps its pydoc half when only the calibration text is replaced
    assert all(torch.equal(a, b) for a, b in zip(held_out, token_slices(tok, 0, 2 * 16, 16)[1]))
    with pytest.raises(ValueError, match="calib_tokens=6400 exceeds the text available to it: its 400 windows need "
                                         "6000 text tokens, found 3 in the calibration texts; that is less"):
        token_slices(tok, 400 * 16, 0, 16, calib_texts=["w1 w2 w3"])
    with pytest.raises(ValueError, match="less than one window of seq_len=16 .* give more text or pass seq_len<16"):
        token_slices(tok, 2 * 16, 0, 16, calib_texts=["w1 w2 w3"])
    with pytest.raises(ValueError, match="leaves no room"):
        token_slices(_BosEos(), 4, 0, 2)


class _BosEos:
    """Adds a BOS and an EOS around every text: ids are word positions + 10."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [10 + i for i, _ in enumerate(text.split())]
        return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}


def test_windows_with_bos_and_eos():
    calib, _ = token_slices(_BosEos(), 2 * 5, 0, 5)
    assert [w[0].tolist() for w in calib] == [[1, 10, 11, 12, 2], [1, 13, 14, 15, 2]]


def test_importing_compress_changes_no_environment_variable(tmp_path):
    """Our modules set nothing (HF_HUB_OFFLINE used to be set on import); the dependencies are imported first, since
    peft's import of torch._inductor sets TORCHINDUCTOR_CACHE_DIR itself."""
    code = ("import os, torch, transformers, peft, datasets, compressed_tensors; before = dict(os.environ); "
            "import compress.models, compress.main_job, compress.export, compress.text_data; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
            "assert 'HF_HUB_OFFLINE' not in os.environ")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bos-llama")
    tiny_llama(hidden=32, intermediate=64).save_pretrained(path)
    bos_tokenizer().save_pretrained(path)
    return path


def test_cli_user_data_with_bos(bos_model_dir, tmp_path, capsys):
    """--calib-data (JSONL) / --eval-data (text) are used, and every evaluation window starts with BOS.

    The dense perplexity printed equals the one of windows built here by hand: ``[BOS] + 31 text tokens``.
    """
    from transformers import AutoModelForCausalLM

    from compress.main_job import main

    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": _words(200, s)}) + "\n" for s in range(4)))
    (tmp_path / "eval.txt").write_text(_words(400, 99))
    summary = main(["--model-path", str(bos_model_dir), "--calib-data", str(tmp_path / "calib.jsonl"), "--eval-data",
                    str(tmp_path / "eval.txt"), "--calib-tokens", "256", "--eval-tokens", "128", "--seq-len", "32",
                    "--eora-rank", "2", "--export-dtype", "float32", "--no-progress", "--threads", "1"])
    assert f"calibration {tmp_path / 'calib.jsonl'}" in capsys.readouterr().out
    ids = bos_tokenizer()(_words(400, 99), add_special_tokens=False)["input_ids"]
    windows = [torch.tensor([[1, *ids[31 * i: 31 * (i + 1)]]]) for i in range(4)]
    dense = AutoModelForCausalLM.from_pretrained(bos_model_dir, dtype=torch.float32, local_files_only=True).eval()
    assert perplexity(dense, windows) == pytest.approx(summary["perplexity"]["dense"], rel=1e-6)


@pytest.mark.parametrize("flag", ["--calib-data", "--eval-data"])
def test_cli_data_errors_name_the_flag(bos_model_dir, tmp_path, flag, capsys):
    from compress.main_job import main

    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(SystemExit) as err:
        main(["--model-path", str(bos_model_dir), flag, str(tmp_path / "empty.jsonl"), "--calib-tokens", "64",
              "--eval-tokens", "64", "--seq-len", "32", "--no-progress"])
    assert f"error: {flag}" in str(err.value) and "no text" in str(err.value)
    # too little text: the message names the flags, not token_slices' arguments
    (tmp_path / "short.txt").write_text(_words(40, 0))
    with pytest.raises(SystemExit) as err:
        main(["--model-path", str(bos_model_dir), flag, str(tmp_path / "short.txt"), "--calib-tokens", "640",
              "--eval-tokens", "640", "--seq-len", "32", "--no-progress"])
    message = str(err.value)
    assert "exceeds the text available" in message and "_tokens" not in message, message
    assert ("--calib-tokens 640 exceeds" in message or "--eval-tokens 640 exceeds" in message), message
    assert " =" not in message and "seq_len" not in message, message
    with pytest.raises(SystemExit, match=r"one window of --seq-len 64 .* give more text or pass --seq-len < 64"):
        main(["--model-path", str(bos_model_dir), flag, str(tmp_path / "short.txt"), "--calib-tokens", "64",
              "--eval-tokens", "64", "--seq-len", "64", "--no-progress"])
    (tmp_path / "same.txt").write_text(_words(100, 0))
    with pytest.raises(SystemExit, match="both name"):
        main(["--model-path", str(bos_model_dir), "--calib-data", str(tmp_path / "same.txt"), "--eval-data",
              str(tmp_path / "same.txt"), "--seq-len", "32", "--calib-tokens", "64", "--eval-tokens", "64"])


# --------------------------------------------------------------------------------------------- GGUF
def test_gguf_next_to_a_config_is_refused(tmp_path, capsys):
    from compress.main_job import main

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json"):
        load_gguf(tmp_path / "model.gguf")
    with pytest.raises(SystemExit, match="--model-path .*config.json.*directory of its own"):
        main(["--model-path", str(tmp_path / "model.gguf"), "--no-progress"])
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_gguf(tmp_path / "config.json")


@pytest.mark.slow
def test_model_path_takes_a_gguf_file(tmp_path, smollm2):
    """``--model-path x.gguf`` loads the same model as the embedded SmolLM2 (converted from the same GGUF)."""
    import argparse

    from compress.main_job import _load
    from tensornets.models import _smollm2_source

    gguf, _ = _smollm2_source()
    (tmp_path / gguf.name).symlink_to(gguf)
    # the CLI loads in --export-dtype (float32 here, the reference's)
    model, tok, name = _load(argparse.Namespace(model_path=str(tmp_path / gguf.name), export_dtype="float32"),
                             torch.device("cpu"))
    reference, ref_tok = smollm2
    assert name.endswith(".gguf") and tok("def f(x):")["input_ids"] == ref_tok("def f(x):")["input_ids"]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_directory_files_of_other_types_warn_and_numbers_are_not_text(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text")
    (tmp_path / "docs" / "table.csv").write_text("a,b\n")
    with pytest.warns(UserWarning, match=r"--calib-data .*1 file\(s\) of other types are not read .*table.csv"):
        assert load_texts(tmp_path / "docs") == ["some text"]
    (tmp_path / "numbers.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"column 'text' holds no strings \(int values\)"):
        load_texts(tmp_path / "numbers.jsonl")
