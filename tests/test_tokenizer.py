"""Tests for tinyserve.tokenizer.

Fast tests build tiny tokenizers (a byte-level GGUF written with gguf.GGUFWriter, an HF-style
directory). Slow tests load the real SmolLM2 file and compare against HF transformers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyserve.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError

SMOLLM2 = Path(
    os.environ.get(
        "TINYSERVE_SMOLLM2",
        Path.home() / ".cache/tinyserve/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------- tiny GGUF


def _byte_chars():
    from tokenizers import pre_tokenizers

    # ByteLevel's alphabet, sorted so ids are deterministic.
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _write_gguf(path, *, model="gpt2", pre="smollm", merges=("o k",), extra=(), add_bos=True,
                template=CHATML):
    """A GGUF holding only tokenizer metadata: 3 control tokens, 1 user-defined token, the 256
    byte tokens, then one token per merge."""
    import gguf

    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = control + ["<think>"] + _byte_chars() + [a + b for a, b in (m.split() for m in merges)]
    tokens += list(extra)
    types = [3] * len(control) + [4] + [1] * (len(tokens) - len(control) - 1)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(merges))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def test_from_gguf_tiny(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    tokens = _write_gguf(path, merges=["h e", "l l", "he ll", "Ġ w"])
    # Both a path and an open reader are accepted.
    for source in (path, str(path), gguf.GGUFReader(path)):
        tok = Tokenizer.from_gguf(source)
        assert len(tok) == tok.vocab_size == len(tokens)
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
        assert tok.add_bos and tok.bos_token == "<|im_start|>"

    ids = tok.encode("hello world", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["hell", "o", "Ġw", "o", "r", "l", "d"]
    assert tok.encode("hello world") == [1] + ids  # add_bos_token is set in this file
    assert tok.decode(ids) == "hello world"

    # Control and user-defined tokens written in the text come out as one id each.
    ids = tok.encode("<|im_start|>user\n<think>hi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2 and tok.token_to_id("<think>") == 3 and 3 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\n<think>hi"  # <think> is not special
    assert tok.stop_token_ids == {0, 2}

    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_from_gguf_pre_tokenizer_split(tmp_path):
    # "3 4" ranks first, so the split decides the ids: one GPT-2 word "12345" gives 12|34|5,
    # Llama 3's 1-3 digit groups give 12|3 + 45, Qwen 2's single digits give 1|2|3|4|5.
    # "smollm" gets the GPT-2 split, as in transformers' GGUF converter (tokenizer/gguf_bpe.py).
    merges = ["3 4", "1 2", "4 5"]
    expected = {"gpt2": ["12", "34", "5"], "smollm": ["12", "34", "5"],
                "llama-bpe": ["12", "3", "45"], "qwen2": ["1", "2", "3", "4", "5"]}
    for pre, pieces in expected.items():
        path = tmp_path / f"{pre}.gguf"
        _write_gguf(path, pre=pre, merges=merges)
        tok = Tokenizer.from_gguf(path)
        assert [tok.id_to_token(i) for i in tok.encode("12345", add_special_tokens=False)] == pieces


def test_from_gguf_errors(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_gguf(path, model="llama")
    with pytest.raises(TokenizerError, match="llama"):
        Tokenizer.from_gguf(path)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")
    path = tmp_path / "nomerges.gguf"
    _write_gguf(path, merges=())  # GGUFWriter drops an empty array: the key is missing
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_gguf(path)

    path = tmp_path / "notemplate.gguf"
    _write_gguf(path, template=None)
    with pytest.raises(TokenizerError, match="chat template"):
        Tokenizer.from_gguf(path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_import_without_gguf():
    code = "import sys; sys.modules['gguf'] = None; import tinyserve, tinyserve.tokenizer"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_incremental_decoder_byte_tokens(tmp_path):
    # Only one merge ("ok"): every other UTF-8 byte is its own token, so an emoji spans four ids.
    path = tmp_path / "bytes.gguf"
    _write_gguf(path)
    tok = Tokenizer.from_gguf(path)
    text = "hi 👍🏽 日本 🤖!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))
    dec = IncrementalDecoder(tok)
    deltas = [dec.step(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # held back while a character was partial
    assert "".join(deltas) == text and dec.flush() == ""

    # A stream cut inside a character: held back, then flushed as U+FFFD at the end.
    dec = tok.incremental_decoder()
    assert "".join(dec.step(i) for i in ids[:5]) == "hi "
    assert dec.flush() == "\ufffd"


# ---------------------------------------------------------------------------- from_dir


def _write_dir(root: Path, *, config=True, generation=True):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, "hello": 4, "world": 5, "!": 6}
    backend = RustTokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<s>", "</s>", "<|im_end|>"])
    root.mkdir(parents=True, exist_ok=True)
    backend.save(str(root / "tokenizer.json"))
    if config:
        (root / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "special": True},  # AddedToken form
            "unk_token": "<unk>",
            "add_bos_token": True,
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: "
                             "{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant:{% endif %}",
        }))
    if generation:
        (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))


def test_from_dir(tmp_path):
    _write_dir(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.encode("hello world !") == [1, 4, 5, 6]
    assert tok.encode("hello world !", add_special_tokens=False) == [4, 5, 6]
    assert tok.encode("hello</s>") == [1, 4, 2]
    assert tok.decode([1, 4, 5, 2], skip_special_tokens=True) == "hello world"
    assert tok.stop_token_ids == {2, 3}
    assert tok.id_to_token(5) == "world" and tok.token_to_id("hello") == 4 and len(tok) == 7
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs) == "<s>user: hello</s>\nassistant:"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<s>user: hello</s>\n"


def test_from_dir_minimal_and_missing(tmp_path):
    _write_dir(tmp_path / "bare", config=False, generation=False)
    tok = Tokenizer.from_dir(tmp_path / "bare")
    assert tok.encode("hello world") == [4, 5] and tok.eos_token_id is None
    assert tok.stop_token_ids == {3}  # <|im_end|> is in the vocabulary
    with pytest.raises(TokenizerError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])

    with pytest.raises(TokenizerError, match="tokenizer.json") as err:
        Tokenizer.from_dir(tmp_path / "empty")
    assert isinstance(err.value, ValueError)


def test_template_raise_exception_and_sandbox(tmp_path):
    _write_dir(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    # The template's own errors and the sandbox's refusals arrive as the package's
    # TokenizerError, naming jinja's exception.
    with pytest.raises(TokenizerError, match="TemplateError: roles must alternate"):
        tok.apply_chat_template([], chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="SecurityError"):
        tok.apply_chat_template([], chat_template="{{ ''.__class__.__mro__ }}")
    # Extra keyword arguments are template variables; tojson does not HTML-escape.
    out = tok.apply_chat_template([], chat_template="{{ tools | tojson }}", tools=[{"a": "<b>"}])
    assert out == '[{"a": "<b>"}]'


# ---------------------------------------------------------------------------- real SmolLM2

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "Ça va? naïve café, Straße, Ελληνικά, русский текст",
    "東京は日本の首都です。中文测试，한국어",
    "emoji: 👍🏽 🤖 🇫🇷 👨‍👩‍👧‍👦 ✨",
    "def f(x):\n\tif x:\n\t\treturn x  # tab\n    else:\n        return [1, 2, 3]\n",
    "spaces    and\n\n\nnewlines \n \t \r\n  ",
    "   leading spaces and trailing   ",
    "Numbers: 0 7 42 1234567890 3.14159 -2.5e-10 0xFF 1,000,000",
    "x  1\t\t22 \u00a0\r\n3 \u216b \u0663 \u2460\u2461",  # spaces and non-ASCII numerals by digits
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>no space<|im_start|> around <|endoftext|>",
    "I'm sure they'll say it's fine, we've done it; you'd agree?",
    "",
]


@pytest.fixture(scope="module")
def smollm2_path():
    if not SMOLLM2.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {SMOLLM2} (set TINYSERVE_SMOLLM2 or run `make model`)")
    return SMOLLM2


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )


@pytest.mark.slow
def test_smollm2_metadata(ours):
    assert ours.vocab_size == len(ours) == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    assert ours.add_bos is False
    assert ours.token_to_id("<|im_start|>") == 1 and ours.id_to_token(2) == "<|im_end|>"
    assert ours.stop_token_ids == {0, 2}  # <|endoftext|>, <|im_end|> (eos)
    assert ours.encode("<|im_start|>") == [1]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_ids_match_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(ours, hf):
    one = [{"role": "user", "content": "What is the capital of France?"}]
    three = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
    ]
    for msgs in (one, three):
        expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(msgs, add_generation_prompt=True) == expected
    prompt = ours.apply_chat_template(one)
    assert prompt.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    # The control tokens in the rendered prompt become single ids.
    assert ours.encode(prompt).count(1) == 3 and ours.encode(prompt).count(2) == 2


@pytest.mark.slow
def test_smollm2_incremental_decoder(ours):
    text = "Sure 👍🏽! Paris 🇫🇷 is lovely. 日本語も。"
    ids = ours.encode(text)
    single = [ours.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in single)  # some emoji really is split across tokens
    dec = IncrementalDecoder(ours)
    deltas = [dec.step(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + dec.flush() == text
