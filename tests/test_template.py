"""One template, many renderings: they must agree byte for byte."""
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from fishtune.errors import UserError
from fishtune.template import DEFAULT_SYSTEM_PROMPT, TEMPLATES, get_template

SYSTEMS = [None, DEFAULT_SYSTEM_PROMPT]
ONE_TURN = [{"role": "user", "content": "孔雀鱼多久换一次水？"}]
MULTI_TURN = [
    {"role": "user", "content": "鱼身上有白点还蹭缸"},
    {"role": "assistant", "content": "可能是白点病，先隔离病鱼。"},
    {"role": "user", "content": "要加盐吗？"},
]
ANSWER = {"role": "assistant", "content": "千分之三的盐浴，持续一周。"}


def _hf_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tok.chat_template = chat_template
    return tok


def _with_system(messages, system):
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


def test_alpaca_is_the_seed_format():
    tpl = get_template()
    assert tpl.name == "alpaca"
    assert tpl.question_prompt("孔雀鱼多久换一次水？") == "### Instruction:\n孔雀鱼多久换一次水？\n\n### Response:\n"
    assert tpl.training_text("q", "a") == "### Instruction:\nq\n\n### Response:\na<|endoftext|>"
    assert tpl.training_text("q", "a", "S") == "S\n\n### Instruction:\nq\n\n### Response:\na<|endoftext|>"
    assert set(tpl.stop_strings) == {"###", "<|endoftext|>"}


def test_chatml_is_qwen_native():
    tpl = get_template("chatml")
    assert tpl.question_prompt("hi", "S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|im_end|>" in tpl.stop_strings


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("messages", [ONE_TURN, MULTI_TURN], ids=["single", "multi"])
def test_jinja_matches_python(name, system, messages):
    tpl = get_template(name)
    tok = _hf_tokenizer(tpl.jinja_chat_template())
    prompt = tok.apply_chat_template(_with_system(messages, system), tokenize=False, add_generation_prompt=True)
    assert prompt == tpl.render_prompt(messages, system)
    full = tok.apply_chat_template(_with_system(messages + [ANSWER], system), tokenize=False)
    assert full == tpl.render_conversation(messages + [ANSWER], system)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("system", SYSTEMS)
def test_training_split_is_prompt_plus_completion(name, system):
    tpl = get_template(name)
    conv = MULTI_TURN + [ANSWER]
    prompt, completion = tpl.split_for_training(conv, system)
    assert prompt == tpl.render_prompt(MULTI_TURN, system)
    assert prompt + completion == tpl.render_conversation(conv, system)
    assert completion.endswith(tpl.end_token)


def test_strip_stop_cuts_at_first_stop_string():
    tpl = get_template("alpaca")
    assert tpl.strip_stop("答案。\n\n### Instruction:\n下一个") == ("答案。\n\n", True)
    assert tpl.strip_stop("答案<|endoftext|>") == ("答案", True)
    assert tpl.strip_stop("没有结束") == ("没有结束", False)


def test_ollama_stop_lines_quote_every_stop_string():
    assert get_template("alpaca").ollama_stop_lines() == [
        'PARAMETER stop "###"',
        'PARAMETER stop "<|endoftext|>"',
    ]


def test_unknown_template_names_the_choices():
    with pytest.raises(UserError, match=r"unknown template 'vicuna'; choose one of: alpaca, chatml"):
        get_template("vicuna")


def test_bad_conversations_are_refused():
    tpl = get_template()
    with pytest.raises(UserError, match="last message of a prompt must be a user message"):
        tpl.render_prompt(ONE_TURN + [ANSWER])
    with pytest.raises(UserError, match="expected a user turn, got assistant"):
        tpl.render_prompt([ANSWER] + ONE_TURN)
    with pytest.raises(UserError, match="unknown role 'bot'"):
        tpl.render_prompt([{"role": "bot", "content": "x"}])
