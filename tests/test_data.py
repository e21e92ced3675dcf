"""fishtune.data: reading, validation, normalisation, dedup, split and report."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fishtune.tokens import count_tokens
from fishtune.data import (
    REJECT_CODES,
    DataOptions,
    FieldSpec,
    RawRecord,
    Record,
    Rejection,
    build_report,
    dedup,
    detect_fields,
    format_summary,
    length_stats,
    load_tokenizer,
    normalize_text,
    question_key,
    read_records,
    run_pipeline,
    split_records,
    split_sizes,
    validate_record,
    validate_records,
)
from fishtune.errors import UserError
from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

FISH = ["孔雀鱼", "金鱼", "斗鱼", "锦鲤", "神仙鱼", "灯科鱼"]
SYMPTOMS = ["身上有白点", "不吃食", "浮在水面", "烂尾巴", "呼吸急促"]
CATEGORIES = ["疾病防治", "日常养护", "水质管理", "繁殖"]


def synth_records(n: int, categories: list[str] = CATEGORIES) -> list[dict]:
    """``n`` distinct Chinese Q&A records spread over ``categories``."""
    rows = []
    for i in range(n):
        fish = FISH[i % len(FISH)]
        sym = SYMPTOMS[(i // len(FISH)) % len(SYMPTOMS)]
        rows.append(
            {
                "question": f"第{i}号缸的{fish}{sym}怎么办？",
                "answer": f"先检测水质，第{i}号缸的{fish}需要隔离观察，{sym}时保持水温稳定并少量换水。",
                "category": categories[i % len(categories)],
            }
        )
    return rows


def raw(value, n: int = 1) -> RawRecord:
    return RawRecord(n, f"record {n}", value)


QA = FieldSpec("question", "answer")
MSG = FieldSpec(None, None, messages=True)


def validate(value, spec: FieldSpec = QA):
    return validate_record(raw(value), spec, "alpaca", DEFAULT_SYSTEM_PROMPT)


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- normalising
def test_normalize_text_nfc_crlf_spaces_newlines():
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # NFC
    assert normalize_text("  a\r\nb\rc  ") == "a\nb\nc"
    assert normalize_text("水温\t\t 28度  左右") == "水温 28度 左右"
    assert normalize_text("第一步\u3000\u3000换水") == "第一步 换水"
    assert normalize_text("一行  \n二行") == "一行\n二行"  # no trailing space, single newline kept
    assert normalize_text("段一\n\n\n\n段二") == "段一\n\n段二"  # at most one blank line


def test_question_key_ignores_case_space_and_punctuation():
    assert question_key("鱼 生病了？！") == question_key("鱼生病了") == question_key("鱼生病了，。")
    assert question_key("PH 值多少?") == question_key("ph值多少？")
    assert question_key("ＰＨ值") == question_key("ph值")  # full-width letters
    assert question_key("金鱼") != question_key("锦鲤")


# --------------------------------------------------------------------------- validating
def test_valid_record_is_normalised_and_rendered():
    r = validate({"question": " 孔雀鱼\t\t多久换水？ ", "answer": "每周一次。\r\n换三分之一。", "category": " 养护 ", "tags": "换水，孔雀鱼"})
    assert isinstance(r, Record)
    assert r.question == "孔雀鱼 多久换水？"
    assert r.answer == "每周一次。\n换三分之一。"
    assert r.category == "养护"
    assert r.tags == ["换水", "孔雀鱼"]
    assert r.text == get_template("alpaca").training_text(r.question, r.answer, DEFAULT_SYSTEM_PROMPT)
    assert r.row() == {"id": r.id, "text": r.text, "question": r.question, "answer": r.answer, "category": "养护", "tags": ["换水", "孔雀鱼"]}
    assert len(r.id) == 12


def test_missing_category_becomes_uncategorized_and_tabs_newlines_are_fine():
    r = validate({"question": "问\t题", "answer": "第一行\n第二行"})
    assert isinstance(r, Record) and r.category == "uncategorized" and r.tags == []
    assert "tags" not in r.row()


@pytest.mark.parametrize(
    "value, code, field, message",
    [
        (["q", "a"], "not_object", None, r"is an array \['q', 'a'\], not an object"),
        ("孔雀鱼？", "not_object", None, "is a string"),
        ({"answer": "好"}, "missing_field", "question", r"field 'question' is missing \(record keys: answer\)"),
        ({"question": "问"}, "missing_field", "answer", "field 'answer' is missing"),
        ({"question": "问", "answer": "  \t \n "}, "empty_field", "answer", "field 'answer' is empty"),
        ({"question": "", "answer": "答"}, "empty_field", "question", "field 'question' is empty"),
        ({"question": None, "answer": "答"}, "empty_field", "question", "field 'question' is null"),
        ({"question": 42, "answer": "答"}, "not_string", "question", "field 'question' must be a string, got a number 42"),
        ({"question": "问", "answer": ["答"]}, "not_string", "answer", "must be a string, got an array"),
        ({"question": "问\x07", "answer": "答"}, "control_chars", "question", "control character U\\+0007 at position 1"),
        ({"question": "问", "answer": "答\x00案"}, "control_chars", "answer", "U\\+0000"),
        ({"question": "？？！", "answer": "答"}, "empty_field", "question", "has no words, only punctuation"),
        ({"question": "问", "answer": "答", "category": 3}, "not_string", "category", "field 'category' must be a string"),
        ({"question": "问", "answer": "答", "tags": 5}, "not_string", "tags", "field 'tags' must be a list"),
        ({"question": "问", "answer": "答", "tags": ["a", 1]}, "not_string", "tags", "must hold strings"),
    ],
)
def test_each_validation_rule_has_a_stable_code(value, code, field, message):
    r = validate(value)
    assert isinstance(r, Rejection)
    assert r.code == code and code in REJECT_CODES
    assert r.field == field
    assert r.raw == value
    import re

    assert re.search(message, r.message), r.message
    assert "\n" not in r.message


def test_crlf_is_not_a_control_char():
    assert isinstance(validate({"question": "问", "answer": "一\r\n二\r三"}), Record)


def test_instruction_input_output_records_join_input_into_question():
    spec = FieldSpec("instruction", "output")
    r = validate({"instruction": "解释白点病", "input": "斗鱼", "output": "一种寄生虫病。"}, spec)
    assert isinstance(r, Record) and r.question == "解释白点病\n斗鱼"
    r = validate({"instruction": "解释白点病", "input": "", "output": "一种寄生虫病。"}, spec)
    assert r.question == "解释白点病"


def test_messages_record_multi_turn():
    msgs = [
        {"role": "user", "content": "我的金鱼不吃东西"},
        {"role": "assistant", "content": "先测水质。"},
        {"role": "user", "content": "氨氮偏高怎么办？"},
        {"role": "assistant", "content": "换水三分之一。"},
    ]
    r = validate({"messages": msgs, "category": "水质"}, MSG)
    assert isinstance(r, Record)
    assert (r.question, r.answer, r.category) == ("氨氮偏高怎么办？", "换水三分之一。", "水质")
    assert r.text == get_template("alpaca").render_conversation(msgs, DEFAULT_SYSTEM_PROMPT)
    assert "messages" not in r.row() and "prompt" not in r.row()
    assert r.row()["history"] == msgs[:2]
    # finetune can rebuild prompt/completion (prompt masking) from history + question/answer
    prompt, completion = get_template("alpaca").split_for_training(
        r.history + [{"role": "user", "content": r.question}, {"role": "assistant", "content": r.answer}], DEFAULT_SYSTEM_PROMPT
    )
    assert prompt + completion == r.text
    # A system message in the record overrides the default system prompt.
    r2 = validate({"messages": [{"role": "system", "content": "你是助手"}] + msgs[2:]}, MSG)
    assert r2.text.startswith("你是助手\n\n### Instruction:\n氨氮偏高怎么办？")
    assert r2.history == [{"role": "system", "content": "你是助手"}]
    single = validate({"messages": msgs[2:]}, MSG)
    assert single.history == [] and "history" not in single.row()


@pytest.mark.parametrize(
    "messages, code, message",
    [
        ("hi", "bad_messages", "must be a non-empty list"),
        ([], "bad_messages", "must be a non-empty list"),
        (["hi"], "bad_messages", r"messages\[0\] must be an object"),
        ([{"role": "bot", "content": "x"}], "bad_messages", r"messages\[0\].role is 'bot'"),
        ([{"role": "user", "content": "q"}], "bad_messages", "must end with an assistant answer"),
        ([{"role": "assistant", "content": "a"}], "bad_messages", "turn 1 of 'messages': expected a user turn, got assistant"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}], "empty_field", r"messages\[1\].content"),
        ([{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}], "not_string", r"messages\[0\].content"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "missing_field", r"messages\[0\].content"),
    ],
)
def test_bad_messages_records(messages, code, message):
    import re

    r = validate({"messages": messages}, MSG)
    assert isinstance(r, Rejection) and r.code == code, r
    assert re.search(message, r.message), r.message


def test_messages_field_missing():
    r = validate({"question": "q"}, MSG)
    assert isinstance(r, Rejection) and (r.code, r.field) == ("missing_field", "messages")


# --------------------------------------------------------------------------- dedup
def test_dedup_exact_and_near_keep_first():
    raws = [
        {"question": "白点病怎么治？", "answer": "升温加盐。"},
        {"question": "白点病怎么治？", "answer": "升温加盐。"},  # exact
        {"question": "白点病 怎么治", "answer": "用药。"},  # near: same question modulo space/punct
        {"question": "白点病怎么治?!", "answer": "升温加盐。"},  # near (different punctuation)
        {"question": "水霉病怎么治？", "answer": "盐浴。"},
        {"question": "  白点病怎么治？ ", "answer": "升温加盐。 "},  # exact after normalisation
    ]
    recs, bad = validate_records([raw(v, i) for i, v in enumerate(raws, 1)], QA, "alpaca", None)
    assert not bad
    kept, dups = dedup(recs)
    assert [r.number for r in kept] == [1, 5]
    assert [(d.number, d.duplicate_of, d.kind) for d in dups] == [(2, 1, "exact"), (3, 1, "near"), (4, 1, "near"), (6, 1, "exact")]


# --------------------------------------------------------------------------- split
def _records(n: int, categories=CATEGORIES) -> list[Record]:
    recs, bad = validate_records(
        [raw(v, i) for i, v in enumerate(synth_records(n, categories), 1)], QA, "alpaca", DEFAULT_SYSTEM_PROMPT
    )
    assert not bad
    return recs


@pytest.mark.parametrize("n", [3, 5, 10, 11, 99, 100, 120, 1001])
def test_split_sizes_valid_and_test_never_empty(n):
    tr, va, te = split_sizes(n, 0.1, 0.1)
    assert tr + va + te == n and tr >= 1 and va >= 1 and te >= 1
    if n >= 100:
        assert abs(va - n * 0.1) <= 1 and abs(te - n * 0.1) <= 1


def test_split_sizes_edge_cases():
    assert split_sizes(1, 0.1, 0.1) == (1, 0, 0)
    assert split_sizes(2, 0.1, 0.1) == (2, 0, 0)
    assert split_sizes(100, 0.2, 0.0) == (80, 20, 0)
    assert split_sizes(3, 0.5, 0.4) == (1, 1, 1)


def test_split_invariants_no_leak_nonempty_stratified_deterministic():
    recs = _records(120)
    a = split_records(recs, 0.8, 0.1, 0.1, seed=42)
    sizes = {s: len(a[s]) for s in a}
    assert sizes == {"train": 96, "valid": 12, "test": 12}
    keys = [r.question_key for s in a for r in a[s]]
    assert len(keys) == len(set(keys)) == 120  # every record once, no question in two splits
    # stratified: 30 records per category -> 3 valid + 3 test each
    for s, want in (("valid", 3), ("test", 3), ("train", 24)):
        assert Counter(r.category for r in a[s]) == {c: want for c in CATEGORIES}
    # deterministic for the same input + seed, different for another seed
    again = split_records(recs, 0.8, 0.1, 0.1, seed=42)
    assert {s: [r.number for r in again[s]] for s in again} == {s: [r.number for r in a[s]] for s in a}
    other = split_records(recs, 0.8, 0.1, 0.1, seed=7)
    assert [r.number for r in other["valid"]] != [r.number for r in a["valid"]]
    # each split is in source order
    for s in a:
        assert [r.number for r in a[s]] == sorted(r.number for r in a[s])


def test_split_stratifies_uneven_categories_proportionally():
    cats = ["大类"] * 7 + ["中类"] * 2 + ["小类"]  # 70% / 20% / 10%
    recs = _records(200, cats)
    sp = split_records(recs, 0.8, 0.1, 0.1, seed=1)
    total = Counter(r.category for r in recs)
    for s, ratio in (("valid", 0.1), ("test", 0.1)):
        got = Counter(r.category for r in sp[s])
        for c in total:
            assert abs(got[c] - total[c] * ratio) <= 1, (s, c, got)


def test_split_small_categories_keep_a_train_record():
    recs = _records(12, ["a", "b", "c", "d", "e", "f"])  # 2 per category
    sp = split_records(recs, 0.8, 0.1, 0.1, seed=0)
    assert len(sp["valid"]) == 1 and len(sp["test"]) == 1
    assert {r.category for r in sp["train"]} == {"a", "b", "c", "d", "e", "f"}


def test_split_one_record_categories_are_picked_by_seed_not_name():
    recs = _records(40, [f"类{i:02d}" for i in range(40)])  # every category has one record
    picks = {tuple(sorted(r.category for r in split_records(recs, 0.8, 0.1, 0.1, seed)["valid"])) for seed in range(5)}
    assert len(picks) > 1
    assert all(len(p) == 4 for p in picks)


@pytest.mark.parametrize(
    "ratios, message",
    [
        ((0.8, 0.1, 0.2), "add up to 1.1"),
        ((0.0, 0.5, 0.5), "--train-ratio must be greater than 0"),
        ((0.9, -0.1, 0.2), "--valid-ratio -0.1 is out of range"),
    ],
)
def test_bad_ratios(ratios, message):
    with pytest.raises(UserError, match=message):
        split_records(_records(10), *ratios, seed=0)


# --------------------------------------------------------------------------- reading
def test_read_json_array_and_data_object(tmp_path):
    rows = synth_records(3)
    src = read_records(write_json(tmp_path / "a.json", rows))
    assert src.format == "json" and [r.value for r in src.records] == rows
    assert src.records[1].where == "record 2"
    src2 = read_records(write_json(tmp_path / "b.json", {"version": 1, "data": rows}))
    assert [r.value for r in src2.records] == rows


def test_read_jsonl_skips_blank_lines_and_tracks_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question": "q1", "answer": "a1"}\n\n{"question": "q2", "answer": "a2"}\n', encoding="utf-8")
    src = read_records(p)
    assert [r.where for r in src.records] == ["record 1 (line 1)", "record 2 (line 3)"]


def test_read_csv_keeps_empty_strings(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('question,answer,category\n"多行\n问题",NA,\n"q2","a2",养护\n', encoding="utf-8")
    src = read_records(p)
    assert src.records[0].value == {"question": "多行\n问题", "answer": "NA", "category": ""}
    assert src.records[1].value["category"] == "养护"


def test_read_utf8_bom_ok(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(synth_records(2), ensure_ascii=False).encode("utf-8"))
    assert len(read_records(p).records) == 2


def test_error_not_utf8(tmp_path):
    p = tmp_path / "gbk.json"
    p.write_bytes(json.dumps(synth_records(2), ensure_ascii=False).encode("gbk"))
    with pytest.raises(UserError, match=r"gbk\.json is not UTF-8 \(byte 0x[0-9a-f]{2} at offset \d+\); re-save it as UTF-8, e\.g\. iconv -f GBK"):
        read_records(p)


def test_error_invalid_json_names_line_and_column(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"question": "q", "answer": "a"},\n {"question": "q2" "answer": "a2"}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json: invalid JSON at line 3 column 20: Expecting ',' delimiter; fix the syntax"):
        read_records(p)


def test_error_invalid_jsonl_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl: invalid JSON at line 2 column \d+: .*each line of a \.jsonl file"):
        read_records(p)


def test_error_unknown_extension_and_missing_file(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("q a", encoding="utf-8")
    with pytest.raises(UserError, match=r"unknown input format '\.txt'; use a \.json, \.jsonl or \.csv file"):
        read_records(p)
    with pytest.raises(UserError, match=r"input file .*nope\.json not found; pass --input PATH"):
        read_records(tmp_path / "nope.json")


def test_error_wrong_top_level_and_empty(tmp_path):
    with pytest.raises(UserError, match=r"expected a JSON array of records .* got an object; wrap the records"):
        read_records(write_json(tmp_path / "o.json", {"question": "q", "answer": "a"}))
    with pytest.raises(UserError, match="holds no records"):
        read_records(write_json(tmp_path / "e.json", []))
    (tmp_path / "e.csv").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="holds no records"):
        read_records(tmp_path / "e.csv")


# --------------------------------------------------------------------------- fields
@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"question": "q", "answer": "a"}], ("question", "answer", False)),
        ([{"instruction": "q", "input": "", "output": "a"}], ("instruction", "output", False)),
        ([{"prompt": "q", "completion": "a"}], ("prompt", "completion", False)),
        ([{"messages": []}], (None, None, True)),
        # the pair most records have wins, even if the first record lacks it
        ([{"q": 1}, {"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "a"}], ("prompt", "completion", False)),
    ],
)
def test_detect_fields(rows, expected):
    spec = detect_fields([raw(v, i) for i, v in enumerate(rows, 1)], Path("x.json"))
    assert (spec.question, spec.answer, spec.messages) == expected


def test_detect_fields_explicit_and_partial():
    rows = [raw({"q": "问", "a": "答", "answer": "x"})]
    spec = detect_fields(rows, Path("x.json"), "q", "a")
    assert (spec.question, spec.answer) == ("q", "a")
    assert detect_fields(rows, Path("x.json"), "q", None).answer == "answer"
    with pytest.raises(UserError, match="pass --answer-field NAME"):
        detect_fields([raw({"q": "问"})], Path("x.json"), "q", None)


def test_detect_fields_none_found():
    with pytest.raises(UserError, match=r"x\.json: cannot find the question/answer fields \(first record's keys: a, q\); .*pass --question-field and --answer-field"):
        detect_fields([raw({"q": "问", "a": "答"})], Path("x.json"))


# --------------------------------------------------------------------------- tokens
def _tiny_tokenizer(path: Path, texts: list[str]) -> Path:
    """A real (tiny) BPE tokenizer trained on ``texts`` and saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(str(path))
    return path


def test_too_long_with_tokenizer(tmp_path):
    rows = synth_records(30)
    rows[4]["answer"] = " ".join(f"第{i}步换水。" for i in range(200))  # 200+ pre-tokens: far longer
    tpl = get_template("alpaca")
    tok_dir = _tiny_tokenizer(tmp_path / "tok", [tpl.training_text(r["question"], r["answer"], DEFAULT_SYSTEM_PROMPT) for r in rows])
    tok = load_tokenizer(str(tok_dir))
    counts = count_tokens(tok, [tpl.training_text(r["question"], r["answer"], DEFAULT_SYSTEM_PROMPT) for r in rows])
    limit = max(c for i, c in enumerate(counts) if i != 4)
    assert counts[4] > limit
    # alpaca text ends with <|endoftext|> = EOS, so MLX-LM appends nothing
    assert count_tokens(tok, ["a<|endoftext|>"]) == [len(tok("a<|endoftext|>")["input_ids"])]
    assert count_tokens(tok, ["a"]) == [len(tok("a")["input_ids"]) + 1]

    inp = write_json(tmp_path / "in.json", rows)
    out = tmp_path / "out"
    opts = DataOptions(input=inp, output_dir=out, tokenizer=str(tok_dir), max_seq_length=limit)
    with pytest.raises(UserError, match=rf"record 5: training text is {counts[4]} tokens, longer than --max-seq-length {limit}; .*or pass --skip-invalid"):
        run_pipeline(opts)
    assert not out.exists()
    opts.skip_invalid = True
    report = run_pipeline(opts)
    assert report["rejected_by_reason"] == {"too_long": 1}
    assert report["lengths"]["text_tokens"]["max"] == limit
    assert report["max_seq_length"] == limit
    rej = [json.loads(x) for x in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["record"], r["code"]) for r in rej] == [(5, "too_long")]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match=r"--tokenizer .*nope: folder not found; pass a local model/tokenizer folder such as models/smoke-tiny, or qwen2"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"--tokenizer .*empty: cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- report
def test_length_stats():
    assert length_stats([]) is None
    st = length_stats(list(range(1, 101)))
    assert st == {"min": 1, "mean": 50.5, "p50": 50, "p95": 95, "max": 100}


def test_report_reconciles_and_summary(tmp_path):
    rows = synth_records(20)
    rows.append(dict(rows[0]))  # exact dup
    rows.append({**rows[1], "answer": "另一个答案"})  # near dup
    rows.append({"question": "缺答案"})
    inp = write_json(tmp_path / "in.json", rows)
    from fishtune.data import options_fingerprint

    opts = DataOptions(input=inp, output_dir=tmp_path / "o", skip_invalid=True)
    src = read_records(inp)
    recs, bad = validate_records(src.records, QA, "alpaca", DEFAULT_SYSTEM_PROMPT)
    kept, dups = dedup(recs)
    sp = split_records(kept, 0.8, 0.1, 0.1, 42)
    rep = build_report(src, opts, QA, sp, bad, dups)
    c = rep["counts"]
    assert c == {"records_in": 23, "kept": 20, "rejected": 1, "exact_duplicates": 1, "near_duplicates": 1}
    assert c["records_in"] == c["kept"] + c["rejected"] + c["exact_duplicates"] + c["near_duplicates"]
    assert rep["options"] == options_fingerprint(opts, QA)
    assert rep["template"] == "alpaca" and rep["system_prompt"] == DEFAULT_SYSTEM_PROMPT
    assert sum(v["total"] for v in rep["categories"].values()) == 20
    text = format_summary(rep, tmp_path / "o")
    assert "23 records in -> 20 kept, 1 rejected (missing_field 1), 1 exact duplicates, 1 near duplicates" in text
    # a broken reconciliation is caught
    with pytest.raises(AssertionError):
        build_report(src, opts, QA, sp, [], dups)


def test_error_invalid_csv(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("question,answer\n鱼病,治疗,多余\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv: invalid CSV \(a row has more fields than the header\); quote cells"):
        read_records(p)
    p.write_text("question,answer\n鱼病,治疗\n鱼病,治疗,多余\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv: invalid CSV \(.*Expected 2 fields in line 3, saw 3\); check quoting"):
        read_records(p)
    p.write_text('question,answer\n"鱼病,治疗\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv: invalid CSV \(.*EOF inside string"):
        read_records(p)
    p.write_text("question,answer\n鱼病\n", encoding="utf-8")  # a short row: the missing cell is empty
    assert read_records(p).records[0].value == {"question": "鱼病", "answer": ""}


def test_error_max_seq_length_and_template(tmp_path):
    inp = write_json(tmp_path / "in.json", synth_records(5))
    with pytest.raises(UserError, match=r"--max-seq-length 0 must be at least 1"):
        run_pipeline(DataOptions(input=inp, output_dir=tmp_path / "o", tokenizer=str(tmp_path), max_seq_length=0))
    with pytest.raises(UserError, match=r"unknown template 'llama'; choose one of: alpaca, chatml"):
        run_pipeline(DataOptions(input=inp, output_dir=tmp_path / "o", template="llama"))


# --------------------------------------------------------------------------- data v2: shapes, labels, groups
def test_mixed_shapes_one_file(tmp_path):
    """question/answer and messages records in one file; every assistant turn is counted as an answer."""
    rows = synth_records(30)
    rows.append({"messages": [{"role": "user", "content": "金鱼白点怎么办？"}, {"role": "assistant", "content": "升温到28–30℃。"},
                              {"role": "user", "content": "按你说的升温三天了还有白点？"}, {"role": "assistant", "content": "继续坚持，总疗程7–10天。"}],
                 "category": CATEGORIES[0]})
    rep = run_pipeline(DataOptions(input=write_json(tmp_path / "in.json", rows), output_dir=tmp_path / "o"))
    assert rep["counts"]["kept"] == 31 and rep["source"]["fields"] == "question/answer + messages"
    assert rep["conversations"] == {"multi_turn": 1, "answers": 32}
    shapes = rep["answer_shapes"]
    assert shapes["short"] + shapes["middle"] + shapes["long"] == 32 and shapes["short"] == 32


def test_labels_outside_the_vocabulary_are_rejected(tmp_path):
    (tmp_path / "vocabulary.yaml").write_text(
        f"categories: [{', '.join(CATEGORIES)}]\ntags: [白点病, 烂鳍]\n", encoding="utf-8")
    rows = synth_records(12)
    rows[3]["tags"] = ["白点病", "白点"]
    rows[5]["category"] = "杂项"
    inp = write_json(tmp_path / "in.json", rows)
    with pytest.raises(UserError, match=r"record 4: tag '白点' is not in .*vocabulary\.yaml \(closest: '白点病'\); "
                                        r"use a listed tag or add it to that file, or pass --skip-invalid .*1 more"):
        run_pipeline(DataOptions(input=inp, output_dir=tmp_path / "o"))
    rep = run_pipeline(DataOptions(input=inp, output_dir=tmp_path / "o", skip_invalid=True))
    assert rep["rejected_by_reason"] == {"unknown_label": 2}
    assert rep["labels"]["vocabulary"] == str(tmp_path / "vocabulary.yaml")
    # --vocabulary none turns the check off; another file can be named
    assert run_pipeline(DataOptions(input=inp, output_dir=tmp_path / "p", vocabulary="none"))["counts"]["rejected"] == 0
    with pytest.raises(UserError, match=r"--vocabulary nope\.yaml: file not found"):
        run_pipeline(DataOptions(input=inp, output_dir=tmp_path / "q", vocabulary="nope.yaml"))


def test_a_question_asked_inside_a_conversation_stays_in_its_split(tmp_path):
    """A conversation that asks a record's question as an earlier turn goes to the same split (every turn is trained)."""
    from fishtune.data.splitting import conversation_groups

    rows = synth_records(60)
    for i in range(0, 60, 3):  # 20 conversations whose first turn is another record's question
        rows.append({"messages": [{"role": "user", "content": rows[i]["question"]}, {"role": "assistant", "content": "先隔离。"},
                                  {"role": "user", "content": f"第{i}号缸隔离以后呢？"}, {"role": "assistant", "content": "观察两周。"}],
                     "category": rows[i]["category"]})
    # ... while a greeting shared by many conversations links nothing
    for i in range(10):
        rows.append({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "请说。"},
                                  {"role": "user", "content": f"第{i}号问题是什么？"}, {"role": "assistant", "content": "好的。"}],
                     "category": CATEGORIES[i % len(CATEGORIES)]})
    src = read_records(write_json(tmp_path / "in.json", rows))
    recs, bad = validate_records(src.records, detect_fields(src.records, src.path), "alpaca", None)
    assert not bad
    groups = conversation_groups(recs)
    assert sorted(len(g) for g in groups).count(2) == 20 and len(groups) == 90 - 20
    splits = split_records(recs, 0.6, 0.2, 0.2, seed=1)
    where = {r.number: s for s, rs in splits.items() for r in rs}
    for i in range(0, 60, 3):
        assert where[i + 1] == where[61 + i // 3]
    assert len({where[81 + i] for i in range(10)}) > 1  # the greeting conversations are spread over the splits
