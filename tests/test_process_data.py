"""process_data.py end to end: files, determinism, errors, --force, --skip-invalid."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fishtune.data import cli as process_data  # process_data.py's main
from fishtune.errors import UserError, run_cli
from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template
from tests.test_data import CATEGORIES, synth_records

REPO = Path(__file__).resolve().parent.parent
cli = run_cli(process_data.main)
OUTPUTS = ("train.jsonl", "valid.jsonl", "test.jsonl", "report.json")


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def run_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "process_data.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_json(tmp_path / "fish.json", synth_records(120))


def test_default_run_writes_splits_and_report(dataset, tmp_path, capsys):
    out = tmp_path / "data"
    assert cli(["--input", str(dataset), "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    splits = {s: read_jsonl(out / f"{s}.jsonl") for s in ("train", "valid", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 96, "valid": 12, "test": 12}
    tpl = get_template("alpaca")
    for row in splits["train"]:
        assert list(row) == ["id", "text", "question", "answer", "category"]
        assert row["text"] == tpl.training_text(row["question"], row["answer"], DEFAULT_SYSTEM_PROMPT)
    ids = [r["id"] for s in splits.values() for r in s]
    assert len(set(ids)) == 120
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    c = report["counts"]
    assert c == {"records_in": 120, "kept": 120, "rejected": 0, "exact_duplicates": 0, "near_duplicates": 0}
    assert report["template"] == "alpaca" and report["system_prompt"] == DEFAULT_SYSTEM_PROMPT
    assert report["splits"] == {"train": 96, "valid": 12, "test": 12}
    assert set(report["categories"]) == set(CATEGORIES)
    assert report["categories"][CATEGORIES[0]] == {"total": 30, "train": 24, "valid": 3, "test": 3}
    assert report["lengths"]["text_tokens"] is None and report["lengths"]["answer_chars"]["max"] > 0
    printed = capsys.readouterr().out
    assert "120 records in -> 120 kept, 0 rejected" in printed and "splits: train 96, valid 12, test 12" in printed


def test_output_is_what_mlx_lm_trains_on(dataset, tmp_path):
    """MLX-LM picks its dataset class from the first row's keys: ours must be a text dataset."""
    import types

    from mlx_lm.tuner.datasets import TextDataset, create_dataset

    out = tmp_path / "data"
    assert cli(["--input", str(dataset), "--output-dir", str(out)]) == 0
    for s in ("train", "valid", "test"):
        ds = create_dataset(read_jsonl(out / f"{s}.jsonl"), None, types.SimpleNamespace())
        assert isinstance(ds, TextDataset)


def test_byte_identical_outputs_and_rerun(dataset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(["--input", str(dataset), "--output-dir", str(a)]) == 0
    assert cli(["--input", str(dataset), "--output-dir", str(b)]) == 0
    assert snapshot(a) == snapshot(b)
    before = snapshot(a)
    assert cli(["--input", str(dataset), "--output-dir", str(a)]) == 0  # same input + options: fine
    assert snapshot(a) == before
    # The same content under another path is the same source: allowed, only the path changes.
    moved = tmp_path / "moved.json"
    moved.write_bytes(dataset.read_bytes())
    assert cli(["--input", str(moved), "--output-dir", str(a)]) == 0
    assert json.loads((a / "report.json").read_text(encoding="utf-8"))["source"]["path"] == str(moved)
    assert all(snapshot(a)[f] == before[f] for f in ("train.jsonl", "valid.jsonl", "test.jsonl"))
    assert cli(["--input", str(dataset), "--output-dir", str(b), "--seed", "7", "--force"]) == 0
    assert snapshot(b)["valid.jsonl"] != before["valid.jsonl"]


def test_force_protects_outputs_from_other_input_or_options(dataset, tmp_path):
    out = tmp_path / "data"
    assert cli(["--input", str(dataset), "--output-dir", str(out)]) == 0
    before = snapshot(out)
    other = write_json(tmp_path / "other.json", synth_records(50))
    with pytest.raises(UserError, match=r"holds data processed from another input \(.*fish\.json, sha256 [0-9a-f]{12}\); pass --force"):
        process_data.main(["--input", str(other), "--output-dir", str(out)])
    with pytest.raises(UserError, match=r"holds data processed with other options \(seed 42 -> 7\); pass --force"):
        process_data.main(["--input", str(dataset), "--output-dir", str(out), "--seed", "7"])
    with pytest.raises(UserError, match=r"template 'alpaca' -> 'chatml'"):
        process_data.main(["--input", str(dataset), "--output-dir", str(out), "--template", "chatml"])
    assert snapshot(out) == before  # nothing touched
    assert cli(["--input", str(other), "--output-dir", str(out), "--force"]) == 0
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["counts"]["records_in"] == 50


def test_force_protects_outputs_of_unknown_origin(dataset, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "train.jsonl").write_text('{"text": "seed"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"train\.jsonl already exists and .*report\.json does not say where it came from; pass --force"):
        process_data.main(["--input", str(dataset), "--output-dir", str(out)])
    assert (out / "train.jsonl").read_text(encoding="utf-8") == '{"text": "seed"}\n'
    assert cli(["--input", str(dataset), "--output-dir", str(out), "--force"]) == 0


def test_input_inside_outputs_refused(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    inp = write_jsonl(out / "train.jsonl", synth_records(20))
    with pytest.raises(UserError, match=r"--input .*train\.jsonl is also an output of this stage; pass another --output-dir"):
        process_data.main(["--input", str(inp), "--output-dir", str(out)])


def _bad_dataset(tmp_path: Path) -> Path:
    rows = synth_records(40)
    del rows[2]["answer"]  # record 3
    rows[5]["question"] = "   "
    rows[7] = "not an object"
    rows[9]["answer"] = 12
    rows[11]["question"] = "坏\x1b字符"
    rows.append(dict(rows[0]))  # exact duplicate
    rows.append({**rows[1], "question": rows[1]["question"].rstrip("？") + "?", "answer": "别的"})  # near duplicate
    return write_json(tmp_path / "bad.json", rows)


def test_invalid_record_stops_and_writes_nothing(tmp_path):
    inp = _bad_dataset(tmp_path)
    out = tmp_path / "data"
    with pytest.raises(
        UserError,
        match=r"bad\.json record 3: field 'answer' is missing \(record keys: category, question\); add it, "
        r"or pass --skip-invalid to drop such records \(4 more invalid records\)$",
    ):
        process_data.main(["--input", str(inp), "--output-dir", str(out)])
    assert not out.exists()


def test_skip_invalid_writes_rejected_jsonl_and_reconciles(tmp_path):
    inp = _bad_dataset(tmp_path)
    out = tmp_path / "data"
    assert cli(["--input", str(inp), "--output-dir", str(out), "--skip-invalid"]) == 0
    rej = read_jsonl(out / "rejected.jsonl")
    assert [(r["record"], r["code"], r["field"]) for r in rej] == [
        (3, "missing_field", "answer"),
        (6, "empty_field", "question"),
        (8, "not_object", None),
        (10, "not_string", "answer"),
        (12, "control_chars", "question"),
    ]
    assert rej[2]["raw"] == "not an object" and all(r["reason"] for r in rej)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    c = report["counts"]
    assert c == {"records_in": 42, "kept": 35, "rejected": 5, "exact_duplicates": 1, "near_duplicates": 1}
    assert c["records_in"] == c["kept"] + c["rejected"] + c["exact_duplicates"] + c["near_duplicates"]
    assert sum(report["splits"].values()) == c["kept"]
    assert report["rejected_by_reason"] == {
        "control_chars": 1, "empty_field": 1, "missing_field": 1, "not_object": 1, "not_string": 1
    }
    assert [(d["record"], d["duplicate_of"], d["kind"]) for d in report["duplicates"]] == [(41, 1, "exact"), (42, 2, "near")]
    # After fixing the data set, a clean run removes the stale rejected.jsonl.
    good = write_json(tmp_path / "bad.json", synth_records(40))
    assert cli(["--input", str(good), "--output-dir", str(out), "--force"]) == 0
    assert not (out / "rejected.jsonl").exists()


def test_zero_valid_records(tmp_path):
    inp = write_json(tmp_path / "x.json", [{"question": "q", "answer": ""}, {"question": "", "answer": "a"}])
    with pytest.raises(UserError, match=r"x\.json: no valid records left out of 2 \(2 rejected: empty_field; 0 duplicates\)"):
        process_data.main(["--input", str(inp), "--output-dir", str(tmp_path / "o"), "--skip-invalid"])
    assert not (tmp_path / "o").exists()


def test_jsonl_instruction_output(tmp_path):
    rows = [{"instruction": r["question"], "input": "", "output": r["answer"], "category": r["category"]} for r in synth_records(30)]
    inp = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    out = tmp_path / "o"
    assert cli(["--input", str(inp), "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["source"]["fields"] == "instruction/output" and report["source"]["format"] == "jsonl"
    assert report["counts"]["kept"] == 30
    assert {r["question"] for r in read_jsonl(out / "train.jsonl")} <= {r["instruction"] for r in rows}


def test_csv_prompt_completion_with_explicit_category_field(tmp_path):
    inp = tmp_path / "qa.csv"
    with open(inp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion", "topic", "tags"])
        for r in synth_records(30):
            w.writerow([r["question"], r["answer"] + "\r\n第二段。", r["category"], "金鱼;水质"])
    out = tmp_path / "o"
    assert cli(["--input", str(inp), "--output-dir", str(out), "--category-field", "topic"]) == 0
    rows = read_jsonl(out / "train.jsonl")
    assert rows[0]["answer"].endswith("\n第二段。") and rows[0]["tags"] == ["金鱼", "水质"]
    assert rows[0]["category"] in CATEGORIES
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["source"]["format"] == "csv" and report["options"]["category_field"] == "topic"


def test_custom_field_names(tmp_path):
    rows = [{"问题": r["question"], "回答": r["answer"]} for r in synth_records(12)]
    inp = write_json(tmp_path / "cn.json", {"data": rows})
    out = tmp_path / "o"
    assert cli(["--input", str(inp), "--output-dir", str(out), "--question-field", "问题", "--answer-field", "回答"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["counts"]["kept"] == 12 and report["categories"] == {"uncategorized": {"total": 12, "train": 10, "valid": 1, "test": 1}}


def test_messages_records_and_chatml_template(tmp_path):
    rows = []
    for r in synth_records(20):
        rows.append({"messages": [
            {"role": "user", "content": "你好，我有问题"},
            {"role": "assistant", "content": "请说。"},
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r["answer"]},
        ], "category": r["category"]})
    inp = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "o"
    assert cli(["--input", str(inp), "--output-dir", str(out), "--template", "chatml", "--system-prompt", "你是鱼病助手"]) == 0
    by_q = {r["messages"][2]["content"]: r for r in rows}
    tpl = get_template("chatml")
    got = read_jsonl(out / "train.jsonl") + read_jsonl(out / "valid.jsonl") + read_jsonl(out / "test.jsonl")
    assert len(got) == 20
    for row in got:
        assert set(row) == {"id", "text", "question", "answer", "category", "history"}
        assert row["text"] == tpl.render_conversation(by_q[row["question"]]["messages"], "你是鱼病助手")
        assert row["history"] == by_q[row["question"]]["messages"][:2]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["source"]["fields"] == "messages"
    assert (report["template"], report["system_prompt"]) == ("chatml", "你是鱼病助手")


def test_zero_test_ratio_writes_no_empty_file(dataset, tmp_path):
    out = tmp_path / "o"
    assert cli(["--input", str(dataset), "--output-dir", str(out), "--train-ratio", "0.9", "--valid-ratio", "0.1", "--test-ratio", "0"]) == 0
    assert not (out / "test.jsonl").exists()  # MLX-LM crashes on an empty .jsonl
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["splits"] == {"train": 108, "valid": 12, "test": 0} and report["files"]["test"] is None


def test_bad_ratio_flags(dataset, tmp_path):
    with pytest.raises(UserError, match=r"add up to 1\.1 \(0\.8\+0\.1\+0\.2\); make them add up to 1"):
        process_data.main(["--input", str(dataset), "--output-dir", str(tmp_path / "o"), "--test-ratio", "0.2"])


def test_output_dir_that_is_a_file(dataset, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"--output-dir .*afile is a file, not a folder; pass a folder"):
        process_data.main(["--input", str(dataset), "--output-dir", str(afile)])
    with pytest.raises(UserError, match=r"can't create --output-dir .*afile/sub \(Not a directory\); pass a writable"):
        process_data.main(["--input", str(dataset), "--output-dir", str(afile / "sub")])
    assert afile.read_text(encoding="utf-8") == "x"


# --------------------------------------------------------------------------- subprocess: exit 2, one line
@pytest.mark.parametrize(
    "make_input, extra, message",
    [
        (lambda d: _bad_dataset(d), [], r"^error: .*bad\.json record 3: field 'answer' is missing .*or pass --skip-invalid"),
        (lambda d: (d / "broken.json").write_text('[{"question": "q",}]', encoding="utf-8") and d / "broken.json", [],
         r"^error: .*broken\.json: invalid JSON at line 1 column 19: .*fix the syntax"),
        (lambda d: (d / "gbk.csv").write_bytes("question,answer\n鱼病,治疗\n".encode("gbk")) and d / "gbk.csv", [],
         r"^error: .*gbk\.csv is not UTF-8 .*iconv"),
        (lambda d: (d / "qa.xlsx").write_bytes(b"x") and d / "qa.xlsx", [], r"^error: .*unknown input format '\.xlsx'"),
        (lambda d: d / "missing.json", [], r"^error: input file .*missing\.json not found; pass --input PATH"),
    ],
)
def test_subprocess_errors_exit_2_one_line(tmp_path, make_input, extra, message):
    import re

    inp = make_input(tmp_path)
    out = tmp_path / "out"
    proc = run_script("--input", str(inp), "--output-dir", str(out), *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_subprocess_success_and_force_refusal(dataset, tmp_path):
    out = tmp_path / "out"
    proc = run_script("--input", str(dataset), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "120 records in -> 120 kept" in proc.stdout
    proc = run_script("--input", str(dataset), "--output-dir", str(out), "--seed", "1")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_subprocess_outputs_do_not_depend_on_hash_seed(tmp_path):
    rows = synth_records(60, ["疾病", "养护", "水质", "繁殖", "器材"])
    for i in range(0, 60, 7):
        rows[i]["tags"] = ["甲", "乙"]
    inp = write_json(tmp_path / "in.json", rows)
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, str(REPO / "process_data.py"), "--input", str(inp), "--output-dir", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(snapshot(out))
    assert outs[0] == outs[1]


def test_help_is_cheap():
    # Nothing heavy at import: the script module must not pull in pandas/transformers.
    code = "import sys, process_data; process_data.build_parser(); print('pandas' in sys.modules, 'transformers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False False", proc.stderr


# --------------------------------------------------------------------------- the real data set (optional)
REAL = REPO / "data" / "fish_care_dataset.json"


def test_real_dataset_processes_cleanly(tmp_path):
    out = tmp_path / "data"
    assert cli(["--input", str(REAL), "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    c = report["counts"]
    assert c["rejected"] == 0, report["rejections"][:3]
    assert c["records_in"] == c["kept"] + c["exact_duplicates"] + c["near_duplicates"]
    assert report["splits"]["valid"] > 0 and report["splits"]["test"] > 0


def test_qwen2_tokenizer_lengths(dataset, tmp_path, smoke_model_dir):
    out = tmp_path / "data"
    assert cli(["--input", str(dataset), "--output-dir", str(out), "--tokenizer", str(smoke_model_dir)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    st = report["lengths"]["text_tokens"]
    assert 0 < st["min"] <= st["p50"] <= st["p95"] <= st["max"] <= 1024
    assert report["tokenizer"] == str(smoke_model_dir) and report["max_seq_length"] == 1024


def test_tokenizer_qwen2_needs_no_model_folder(dataset, tmp_path, monkeypatch, smoke_model_dir):
    # --tokenizer qwen2 rebuilds Qwen2's tokenizer offline: the same counts as the smoke model's copy of it.
    monkeypatch.chdir(tmp_path)  # no folder named qwen2 here
    reports = {}
    for tok in ("qwen2", str(smoke_model_dir)):
        out = tmp_path / f"out-{len(reports)}"
        assert cli(["--input", str(dataset), "--output-dir", str(out), "--tokenizer", tok]) == 0
        reports[tok] = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert reports["qwen2"]["lengths"]["text_tokens"] == reports[str(smoke_model_dir)]["lengths"]["text_tokens"]
    assert reports["qwen2"]["tokenizer"] == "qwen2"
