"""Content checks for the fish-care data set (issue 15).

Standard library + PyYAML only; no fishtune import, no model.  Checks
data/fish_care_dataset.json and every data/staging/*.json file that exists:

  (a) facts:   every number an answer states for a purpose listed in
               data/facts.yaml lies inside that fact's range
  (b) labels:  categories and tags come from data/vocabulary.yaml, disease
               questions are filed under 疾病, one range notation, no
               「水族医生」, well-formed multi-turn records
  (c) shapes:  short, middle and long answers all present
  (d) style:   the reflexive salt formula and the closing referral are rare
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MAIN_FILE = DATA / "fish_care_dataset.json"
STAGING = DATA / "staging"
FACTS_FILE = DATA / "facts.yaml"
VOCAB_FILE = DATA / "vocabulary.yaml"

# ----------------------------------------------------------------- loading


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def data_files() -> list[Path]:
    files = [MAIN_FILE]
    if STAGING.is_dir():
        files += sorted(STAGING.glob("*.json"))
    return files


def load_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    assert isinstance(data, list), f"{path}: top level must be a JSON array"
    return data


_CACHE: dict = {}


def all_records() -> list[tuple[str, int, dict]]:
    """(file name, index, record) over the main file and staging files."""
    if "records" not in _CACHE:
        out = []
        for path in data_files():
            name = str(path.relative_to(ROOT))
            for i, rec in enumerate(load_records(path)):
                out.append((name, i, rec))
        _CACHE["records"] = out
    return _CACHE["records"]


def main_records() -> list[tuple[str, int, dict]]:
    name = str(MAIN_FILE.relative_to(ROOT))
    return [r for r in all_records() if r[0] == name]


def is_messages(rec: dict) -> bool:
    return "messages" in rec


def user_turns(rec: dict) -> list[str]:
    if is_messages(rec):
        return [m.get("content", "") for m in rec["messages"] if m.get("role") == "user"]
    return [rec.get("question", "")]


def first_question(rec: dict) -> str:
    turns = user_turns(rec)
    return turns[0] if turns else ""


def assistant_turns(rec: dict) -> list[tuple[str, str]]:
    """(context, answer) for every assistant turn.

    The context of a turn is everything said up to and including it.
    """
    if is_messages(rec):
        out = []
        msgs = rec["messages"]
        for i, m in enumerate(msgs):
            if m.get("role") == "assistant":
                ctx = "\n".join(x.get("content", "") for x in msgs[: i + 1])
                out.append((ctx, m.get("content", "")))
        return out
    return [(rec.get("question", "") + "\n" + rec.get("answer", ""), rec.get("answer", ""))]


def all_texts(rec: dict) -> list[str]:
    if is_messages(rec):
        return [m.get("content", "") for m in rec["messages"]]
    return [rec.get("question", ""), rec.get("answer", "")]


def all_answers(records) -> list[str]:
    return [a for _, _, rec in records for _, a in assistant_turns(rec)]


# ------------------------------------------------------------ fact checker

SENTENCE_SPLIT = re.compile(r"[。！？；!?;\n]")
NUM = r"\d+(?:\.\d+)?(?:/\d+)?"
SEP = r"\s*(?:–|-|~|～|到|至)\s*"
SHARE = r"\d+/\d+|\d+(?:\.\d+)?(?:\s*%)?"


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_SPLIT.split(text) if s.strip()]


class Fact:
    def __init__(self, spec: dict):
        self.id = spec["id"]
        self.unit = spec.get("unit", "")
        lo, hi = spec["range"]
        self.lo, self.hi = float(lo), float(hi)
        m = spec.get("match") or {}
        self.context = [re.compile(p) for p in m.get("context", [])]
        self.sentence = [re.compile(p) for p in m.get("sentence", [])]
        self.exclude = [re.compile(p) for p in m.get("exclude", [])]
        self.kind = m.get("kind", "number")
        before = m.get("before")
        after = m.get("after", "")
        if self.kind == "share":
            lead = rf"(?:{before})(?:约|大约)?\s*" if before else r"(?<![\d./])"
            self.value = re.compile(lead + rf"(?P<lo>{SHARE})(?:{SEP}(?P<hi>{SHARE}))?")
        else:
            lead = rf"(?:{before})(?:约|大约)?\s*" if before else r"(?<![\d./])"
            self.value = re.compile(
                lead + rf"(?P<lo>{NUM})(?:\s*(?:{after})?{SEP}(?P<hi>{NUM}))?(?:{after})"
            )
        self.examples = spec.get("examples") or {}

    def applies(self, context: str, sentence: str) -> bool:
        return (
            all(p.search(context) for p in self.context)
            and all(p.search(sentence) for p in self.sentence)
            and not any(p.search(sentence) for p in self.exclude)
        )

    @staticmethod
    def _num(s: str) -> float:
        s = s.replace(" ", "")
        if "/" in s:
            a, b = s.split("/", 1)
            return float(a) / float(b)
        return float(s.rstrip("%"))

    def values(self, sentence: str) -> list[float]:
        vals: list[float] = []
        for m in self.value.finditer(sentence):
            lo, hi = m.group("lo"), m.group("hi")
            if self.kind == "share":
                parts = [p for p in (lo, hi) if p]
                if not any("/" in p or "%" in p for p in parts):
                    continue  # a bare number is not a water share
                pct = any("%" in p for p in parts)
                for p in parts:
                    v = self._num(p)
                    if "/" not in p and pct:
                        v /= 100.0
                    vals.append(v)
            else:
                vals.append(self._num(lo))
                if hi:
                    vals.append(self._num(hi))
        return vals


def load_facts() -> list[Fact]:
    if "facts" not in _CACHE:
        spec = load_yaml(FACTS_FILE)
        _CACHE["facts"] = [Fact(f) for f in spec["facts"]]
    return _CACHE["facts"]


def check_turn(facts, context: str, answer: str):
    """Yield (fact, value, sentence, ok) for every number stated for a fact."""
    for sent in sentences(answer):
        for fact in facts:
            if not fact.applies(context, sent):
                continue
            for v in fact.values(sent):
                yield fact, v, sent, fact.lo - 1e-9 <= v <= fact.hi + 1e-9


def check_record(facts, rec: dict):
    for ctx, ans in assistant_turns(rec):
        yield from check_turn(facts, ctx, ans)


# ---------------------------------------------------------------- (a) facts


def test_facts_file_is_well_formed():
    spec = load_yaml(FACTS_FILE)
    ids = [f["id"] for f in spec["facts"]]
    assert len(ids) == len(set(ids)), "duplicate fact ids"
    for f in spec["facts"]:
        for key in ("id", "purpose", "unit", "range", "match", "examples"):
            assert key in f, f"fact {f.get('id')}: missing {key}"
        lo, hi = f["range"]
        assert lo <= hi, f"fact {f['id']}: range {lo} > {hi}"
        assert "ok" in f["examples"] and "bad" in f["examples"], f"fact {f['id']}: needs ok and bad examples"


def test_fact_examples_self_check():
    """Each fact's ok example matches and passes, its bad example matches and fails."""
    problems = []
    for fact in load_facts():
        for kind in ("ok", "bad"):
            text = fact.examples[kind]
            hits = [(v, ok) for f, v, _, ok in check_turn([fact], text, text) if f is fact]
            if not hits:
                problems.append(f"{fact.id}: {kind} example matches nothing: {text}")
            elif kind == "ok" and not all(ok for _, ok in hits):
                problems.append(f"{fact.id}: ok example fails: {text} -> {hits}")
            elif kind == "bad" and all(ok for _, ok in hits):
                problems.append(f"{fact.id}: bad example passes: {text} -> {hits}")
    assert not problems, "\n".join(problems)


def test_checker_catches_a_wrong_white_spot_salt():
    facts = load_facts()
    bad = {"question": "鱼得了白点病怎么办？", "answer": "把水温升到28–30℃，按10‰加盐。",
           "category": "疾病", "tags": ["白点病"]}
    good = dict(bad, answer="把水温升到28–30℃，按3‰加盐。")
    bad_hits = [(f.id, v) for f, v, _, ok in check_record(facts, bad) if not ok]
    assert ("salt_whitespot", 10.0) in bad_hits
    good_hits = list(check_record(facts, good))
    assert any(f.id == "salt_whitespot" and v == 3.0 for f, v, _, _ in good_hits)
    assert all(ok for _, _, _, ok in good_hits)


def test_checker_reads_ranges_and_shares():
    facts = {f.id: f for f in load_facts()}
    assert facts["salt_long_max"].values("按3–5‰加盐") == [3.0, 5.0]
    assert facts["salt_long_max"].values("按3‰–5‰加盐") == [3.0, 5.0]
    assert facts["water_change_weekly"].values("每周换水1/4–1/3") == pytest.approx([0.25, 1 / 3])
    assert facts["water_change_weekly"].values("每周换水10–20%") == pytest.approx([0.1, 0.2])
    assert facts["water_change_weekly"].values("每周换水2–3次") == []


def test_every_stated_number_is_inside_the_facts_table():
    facts = load_facts()
    failures = []
    for name, idx, rec in all_records():
        for fact, v, sent, ok in check_record(facts, rec):
            if not ok:
                failures.append(
                    f"{name} record {idx}: fact {fact.id} range [{fact.lo:g}, {fact.hi:g}] {fact.unit}: "
                    f"{v:g} in 「{sent}」"
                )
    assert not failures, f"{len(failures)} numbers outside data/facts.yaml:\n" + "\n".join(failures)


def test_every_fact_matches_some_record():
    facts = load_facts()
    seen = set()
    for _, _, rec in all_records():
        for fact, _, _, _ in check_record(facts, rec):
            seen.add(fact.id)
    dead = [f.id for f in facts if f.id not in seen]
    assert not dead, f"facts whose pattern matches no record (dead patterns): {dead}"


# --------------------------------------------------------------- (b) labels

DISEASE_KEYWORDS = [
    "白点", "小瓜虫", "烂鳍", "烂尾", "烂鳃", "水霉", "白毛", "竖鳞", "松鳞", "肠炎", "鳔",
    "失衡", "翻肚", "车轮虫", "锚头鳋", "鱼虱", "打印病", "气泡病", "眼球突出", "眼睛凸",
    "眼睛肿", "口腐", "柱状病", "天鹅绒", "金粉", "头洞", "淋巴囊肿", "溃疡", "充血",
    "血丝", "指环虫", "三代虫", "寄生虫", "病毒", "疱疹", "脊柱弯曲", "背越来越弯", "黑色的斑",
    "白色小虫", "小虫子", "拉白", "白便", "白色的长便便", "嘴巴发白", "马鞍",
]
DRUG_KEYWORDS = re.compile(
    r"盐|药|黄粉|甲基蓝|高锰酸钾|抗生素|碘伏|硫酸镁|泻盐|活性炭|福尔马林|甲醛|铜|ppm|吡喹酮|丁香油|消毒"
)
EMERGENCY_KEYWORDS = re.compile(r"突然|马上|紧急|急救|快不行|中毒|停电|一下子|接连死|浮头|跳|挤在水面|呼吸")
EGG_KEYWORDS = re.compile(r"卵")


def disease_question(q: str) -> str | None:
    for kw in DISEASE_KEYWORDS:
        if kw in q:
            return kw
    return None


def allowed_categories_for_disease_question(q: str) -> set[str]:
    allowed = {"疾病"}
    if DRUG_KEYWORDS.search(q):
        allowed.add("用药安全")
    if EMERGENCY_KEYWORDS.search(q):
        allowed.add("应急处理")
    if EGG_KEYWORDS.search(q):
        allowed.add("繁殖")
    return allowed


def test_vocabulary_file():
    vocab = load_yaml(VOCAB_FILE)
    cats, tags = vocab["categories"], vocab["tags"]
    assert len(cats) == len(set(cats)) and len(tags) == len(set(tags))
    for needed in ("疾病", "水质", "品种饲养", "喂食", "应急处理", "检疫与运输", "用药安全", "繁殖"):
        assert needed in cats
    assert "追问" in tags
    assert 40 <= len(tags) <= 160, f"tag vocabulary should stay small, has {len(tags)}"


def test_categories_and_tags_come_from_the_vocabulary():
    vocab = load_yaml(VOCAB_FILE)
    cats, tags = set(vocab["categories"]), set(vocab["tags"])
    problems = []
    for name, idx, rec in all_records():
        if rec.get("category") not in cats:
            problems.append(f"{name} record {idx}: category {rec.get('category')!r} not in vocabulary")
        t = rec.get("tags")
        if not isinstance(t, list) or not 1 <= len(t) <= 4:
            problems.append(f"{name} record {idx}: needs 1-4 tags, has {t!r}")
            continue
        if len(set(t)) != len(t):
            problems.append(f"{name} record {idx}: duplicate tags {t}")
        for tag in t:
            if tag not in tags:
                problems.append(f"{name} record {idx}: tag {tag!r} not in vocabulary")
        if ("追问" in t) != is_messages(rec):
            problems.append(f"{name} record {idx}: the tag 追问 is for multi-turn records only, and they need it")
    assert not problems, "\n".join(problems)


def test_disease_questions_are_filed_under_disease():
    problems = []
    for name, idx, rec in all_records():
        q = first_question(rec)
        kw = disease_question(q)
        if kw is None:
            continue
        allowed = allowed_categories_for_disease_question(q)
        if rec.get("category") not in allowed:
            problems.append(f"{name} record {idx}: question names 「{kw}」, category {rec.get('category')} "
                            f"not in {sorted(allowed)}: {q}")
    assert not problems, "\n".join(problems)


def test_disease_rule_is_pinned():
    assert disease_question("孔雀鱼烂尾怎么办") == "烂尾"
    assert allowed_categories_for_disease_question("孔雀鱼烂尾怎么办") == {"疾病"}
    assert "用药安全" in allowed_categories_for_disease_question("白点病可以用甲基蓝吗？")
    assert "应急处理" in allowed_categories_for_disease_question("治白点升温后鱼都挤在水面呼吸")
    assert disease_question("多久换一次水？") is None


def test_no_aquarium_doctor():
    problems = [f"{name} record {idx}" for name, idx, rec in all_records()
                if any("水族医生" in t for t in all_texts(rec))]
    assert not problems, "「水族医生」 is not natural Chinese; use 水族兽医 or 有经验的鱼友、水族店镜检: " + ", ".join(problems)


RANGE_BAD = [
    (re.compile(r"\d\s*(?:[‰%℃]|ppm|mg/L)?\s*(?:-|~|～|〜|到|至|—|－)\s*\d"), "use the en dash: 3–5‰, 2–4周"),
    (re.compile(r"\d\s*(?:[‰%℃]|ppm)\s*–\s*\d"), "write the unit once: 3–5‰, not 3‰–5‰"),
    (re.compile(r"\d\s+–|–\s+\d"), "no spaces around the en dash"),
]


def test_one_range_notation():
    problems = []
    for name, idx, rec in all_records():
        for text in all_texts(rec):
            for rx, why in RANGE_BAD:
                m = rx.search(text)
                if m:
                    problems.append(f"{name} record {idx}: 「{text[max(0, m.start() - 8):m.end() + 8]}」 {why}")
    assert not problems, "\n".join(problems)


def test_records_are_well_formed():
    problems = []
    for name, idx, rec in all_records():
        where = f"{name} record {idx}"
        if is_messages(rec):
            if set(rec) != {"messages", "category", "tags"}:
                problems.append(f"{where}: multi-turn keys must be messages, category, tags: {sorted(rec)}")
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not msgs:
                problems.append(f"{where}: messages must be a non-empty list")
                continue
            roles = [m.get("role") for m in msgs]
            for j, m in enumerate(msgs):
                if set(m) != {"role", "content"} or not isinstance(m.get("content"), str) or not m["content"].strip():
                    problems.append(f"{where}: message {j} must be {{role, content}} with text")
            expected = ["user", "assistant"] * (len(msgs) // 2)
            if roles != expected or len(msgs) % 2:
                problems.append(f"{where}: turns must alternate user/assistant, start with user, end with assistant: {roles}")
            n_user = roles.count("user")
            if not 2 <= n_user <= 4:
                problems.append(f"{where}: a conversation has 2-4 user turns, has {n_user}")
        else:
            if set(rec) != {"question", "answer", "category", "tags"}:
                problems.append(f"{where}: single-turn keys must be question, answer, category, tags: {sorted(rec)}")
            for key in ("question", "answer"):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    problems.append(f"{where}: empty {key}")
    assert not problems, "\n".join(problems)


def _norm(q: str) -> str:
    return re.sub(r"[\s，。？！?!,.、：:；;「」“”\"']", "", q)


def test_questions_are_not_repeated():
    seen: dict[str, str] = {}
    problems = []
    for name, idx, rec in all_records():
        for j, q in enumerate(user_turns(rec)):
            if j > 0:
                continue
            key = _norm(q)
            if key in seen:
                problems.append(f"{name} record {idx}: first question repeats {seen[key]}: {q}")
            seen[key] = f"{name} record {idx}"
    assert not problems, "\n".join(problems)


def test_there_are_enough_conversations():
    conv = [rec for _, _, rec in main_records() if is_messages(rec)]
    assert len(conv) >= 60, f"need at least 60 multi-turn conversations, main file has {len(conv)}"


# --------------------------------------------------------------- (c) shapes

SHORT = (30, 80)
LONG = (300, 600)
MAX_LEN = 650


def shape_of(n: int) -> str:
    if n <= SHORT[1]:
        return "short"
    if n < LONG[0]:
        return "middle"
    return "long"


def test_answer_lengths_have_three_shapes():
    lengths = [len(a) for a in all_answers(all_records())]
    n = len(lengths)
    short = sum(SHORT[0] <= x <= SHORT[1] for x in lengths)
    long_ = sum(LONG[0] <= x <= LONG[1] for x in lengths)
    too_long = [x for x in lengths if x > MAX_LEN]
    too_short = [x for x in lengths if x < SHORT[0]]
    assert short >= 0.10 * n, f"short answers ({SHORT[0]}-{SHORT[1]} chars): {short}/{n}, need >= 10%"
    assert long_ >= 0.10 * n, f"long answers ({LONG[0]}-{LONG[1]} chars): {long_}/{n}, need >= 10%"
    assert not too_long, f"answers over {MAX_LEN} chars: {too_long}"
    assert not too_short, f"answers under {SHORT[0]} chars: {too_short}"


# ---------------------------------------------------------------- (d) style

# The reflexive formula: isolate -> 3–5‰ salt for 5–7 days (-> change water).
FORMULA = re.compile(r"(?=.*隔离)(?=.*3–5‰)(?=.*5–7天)", re.S)
SALT_35 = re.compile(r"3–5‰")
REFERRAL = re.compile(r"兽医|专业人士|镜检|有经验的鱼友|水族店|求助|咨询|请教")
VET_ALTERNATIVE = re.compile(r"有经验的鱼友|鱼友|水族店|镜检|显微镜")

# Measured after the data v2 edit (467 assistant turns in the main file): formula 5,
# 3–5‰ in 27 answers (6 %), closing referral in 32 (7 %).  Before it: 3–5‰ in 61 of
# 386 answers and a closing referral in 78.
MAX_FORMULA_MAIN = 8           # answers in the main file with the full formula
MAX_SALT35_MAIN = 35           # main-file answers that recommend 3–5‰ at all
MAX_SALT35_SHARE = 0.10        # share of merged answers that recommend 3–5‰
MAX_REFERRAL_MAIN = 40         # main-file answers that END with a referral
MAX_REFERRAL_SHARE = 0.12      # share of merged answers that END with a referral


def closing_sentence(answer: str) -> str:
    s = sentences(answer)
    return s[-1] if s else ""


def test_reflexive_formula_is_rare():
    main = all_answers(main_records())
    merged = all_answers(all_records())
    n_formula = sum(bool(FORMULA.search(a)) for a in main)
    assert n_formula <= MAX_FORMULA_MAIN, f"「隔离 + 3–5‰ + 5–7天」 in {n_formula} main-file answers (max {MAX_FORMULA_MAIN})"
    n_salt_main = sum(bool(SALT_35.search(a)) for a in main)
    assert n_salt_main <= MAX_SALT35_MAIN, f"3–5‰ salt in {n_salt_main} main-file answers (max {MAX_SALT35_MAIN})"
    n_salt = sum(bool(SALT_35.search(a)) for a in merged)
    assert n_salt <= MAX_SALT35_SHARE * len(merged), f"3–5‰ salt in {n_salt}/{len(merged)} answers"


def test_closing_referral_is_rare():
    main = all_answers(main_records())
    n_main = sum(bool(REFERRAL.search(closing_sentence(a))) for a in main)
    assert n_main <= MAX_REFERRAL_MAIN, f"{n_main} main-file answers end with a referral (max {MAX_REFERRAL_MAIN})"
    merged = all_answers(all_records())
    closing = [a for a in merged if REFERRAL.search(closing_sentence(a))]
    assert len(closing) <= MAX_REFERRAL_SHARE * len(merged), (
        f"{len(closing)}/{len(merged)} answers end with a referral (max {MAX_REFERRAL_SHARE:.0%})")


def test_vet_advice_comes_with_an_alternative():
    problems = []
    for name, idx, rec in all_records():
        for _, ans in assistant_turns(rec):
            if "兽医" in ans and not VET_ALTERNATIVE.search(ans):
                problems.append(f"{name} record {idx}: advises a vet without an alternative "
                                f"(有经验的鱼友、水族店镜检): {ans[:40]}…")
    assert not problems, "\n".join(problems)
