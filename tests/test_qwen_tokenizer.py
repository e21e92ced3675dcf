"""The offline Qwen2 tokenizer reproduces the real one's ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fishtune.errors import UserError
from fishtune.qwen_tokenizer import (
    QWEN2_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_qwen2_tokenizer,
    find_qwen_tiktoken,
    load_tiktoken_ranks,
    ranks_to_vocab_and_merges,
)

# Copied from huggingface/transformers tests/models/qwen2/test_tokenization_qwen2.py
# (Qwen2TokenizationTest.test_tokenizer_integration, checked against the hub's
# Qwen/Qwen-tokenizer); the expected ids are the non-padding part of
# expected_encoding["input_ids"].
HF_INTEGRATION_SEQUENCES = [
    "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
    "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
    "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
    "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
    "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。",
    """```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\n"""
    """tokenizer("世界，你好！")```""",
]
HF_INTEGRATION_IDS = [
    [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320, 30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897, 1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13],  # noqa: E501
    [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034, 104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773],  # noqa: E501
    [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135, 1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594],  # noqa: E501
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2_tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def raw_tok(tok_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def test_fish_question_ids(hf_tok, raw_tok):
    text = "孔雀鱼多久换一次水？"
    expected = [116214, 100655, 106410, 71134, 99796, 52510, 11319]
    assert hf_tok.encode(text) == expected
    assert raw_tok.encode(text).ids == expected


@pytest.mark.parametrize("idx", range(len(HF_INTEGRATION_SEQUENCES)))
def test_transformers_integration_ids(hf_tok, raw_tok, idx):
    text, expected = HF_INTEGRATION_SEQUENCES[idx], HF_INTEGRATION_IDS[idx]
    assert hf_tok(text)["input_ids"] == expected
    assert raw_tok.encode(text).ids == expected


def test_special_tokens(hf_tok):
    for content, token_id in SPECIAL_TOKENS.items():
        assert hf_tok.convert_tokens_to_ids(content) == token_id
        assert hf_tok.encode(content) == [token_id]
    assert len(hf_tok) == 151646
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 151643
    assert hf_tok.pad_token == "<|endoftext|>"
    assert hf_tok.bos_token is None
    # No BOS/EOS added around text.
    assert hf_tok.encode("hi") == [6023]


def test_endoftext_inside_text(hf_tok):
    ids = hf_tok.encode("答案<|endoftext|>下一题")
    assert ids.count(151643) == 1
    assert hf_tok.decode(ids) == "答案<|endoftext|>下一题"
    assert hf_tok.decode(ids, skip_special_tokens=True) == "答案下一题"
    chat = hf_tok.encode("<|im_start|>user\n你好<|im_end|>\n")
    assert chat[0] == 151644 and 151645 in chat


@pytest.mark.parametrize(
    "text",
    [
        "孔雀鱼多久换一次水？一般每周换水一次。",
        "Hello, world! It's   fine.\n\n  Indented\tline\r\nend",
        "🐟🐠🐡 emoji 鱼缸 🤗\u200d mix",
        "   leading and trailing spaces   ",
        "\n\n\n",
        "数字1234567 and ０１２ full-width，标点！？",
        "### Instruction:\n金鱼翻肚子？\n\n### Response:\n停食两三天<|endoftext|>",
    ],
)
def test_roundtrip(hf_tok, raw_tok, text):
    ids = hf_tok.encode(text)
    assert hf_tok.decode(ids) == text
    assert raw_tok.decode(raw_tok.encode(text).ids, skip_special_tokens=False) == text


def test_nfc_normalization(raw_tok):
    # From the transformers Qwen2 test: only NFC is applied.
    assert raw_tok.normalizer.normalize_str("\u03d2\u0301\u03d2\u0308\u017f\u0307") == "\u03d3\u03d4\u1e9b"


def test_tokenizer_files(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["eos_token"] == cfg["pad_token"] == "<|endoftext|>"
    assert cfg["bos_token"] is None
    assert cfg["model_max_length"] == 32768
    assert cfg["chat_template"] == QWEN2_CHAT_TEMPLATE
    assert set(cfg["added_tokens_decoder"]) == {"151643", "151644", "151645"}
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tj["model"]["vocab"]) == 151643
    assert len(tj["model"]["merges"]) == 151643 - 256
    assert tj["post_processor"]["type"] == "ByteLevel"  # adds no tokens
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == tj["model"]["vocab"]
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and merges[1:] == tj["model"]["merges"]


def test_chat_template(hf_tok):
    text = hf_tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


def test_merges_from_small_ranks(tmp_path):
    # A hand-made rank file: "ab" = a+b, "abc" = ab+c; "bc" ranks after "abc".
    import base64

    toks = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"bc"]
    path = tmp_path / "mini.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(toks)))
    ranks = load_tiktoken_ranks(path)
    vocab, merges = ranks_to_vocab_and_merges(ranks)
    assert merges == ["a b", "ab c", "b c"]
    assert vocab["abc"] == 257


def test_bad_rank_file(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text("not-a-valid-line\n")
    with pytest.raises(UserError, match=r"bad\.tiktoken:1: expected 'base64token rank'.*dashscope==2\.0\.2"):
        load_tiktoken_ranks(path)


def test_missing_tiktoken(tmp_path):
    with pytest.raises(UserError, match=r"qwen\.tiktoken not found at .*pip install dashscope==2\.0\.2"):
        build_qwen2_tokenizer(tmp_path / "out", tiktoken_path=tmp_path / "nope.tiktoken")


def test_find_qwen_tiktoken():
    path = find_qwen_tiktoken()
    assert path.name == "qwen.tiktoken" and path.is_file()


def test_llama_cpp_pretokenizer_hash(hf_tok):
    # llama.cpp's convert_hf_to_gguf.py get_vocab_base_pre(): it hashes the ids
    # of this text and maps e636dc30... to tokenizer.ggml.pre = "qwen2"
    # (ref: Qwen/Qwen1.5-7B, same tokenizer as Qwen2). A mismatch would make
    # the GGUF conversion refuse our tokenizer.
    from hashlib import sha256

    chktxt = (
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
        "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
        "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
        "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
    )
    chkhsh = sha256(str(hf_tok.encode(chktxt)).encode()).hexdigest()
    assert chkhsh == "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"
