"""convert_to_gguf.py on the smoke models: real gguf writer, real llama.cpp, real transformers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fishtune.errors import UserError, run_cli
from fishtune.export import gguf_cli
from fishtune.export.gguf_file import read_gguf_header, tensor_type_counts
from fishtune.template import DEFAULT_SYSTEM_PROMPT, get_template

REPO = Path(__file__).resolve().parent.parent

convert = run_cli(gguf_cli.main)


def linked_copy(src: Path, dst: Path) -> Path:
    """An HF folder made of symlinks to ``src``'s files (cheap to tweak)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).symlink_to(f.resolve())
    return dst


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """All metadata (token arrays decoded) and tensor infos by name."""
    kv, infos = read_gguf_header(path, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                               "tokenizer.ggml.merges"))
    return kv, {t.name: t for t in infos}


@pytest.fixture(scope="module")
def f32_run(smoke_model_dir, tmp_path_factory):
    """Convert the tiny model to F32 with the proof on; returns (dir, stdout)."""
    out = tmp_path_factory.mktemp("gguf_f32")
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert_to_gguf.py"), "--hf-model-dir", str(smoke_model_dir),
         "--output-file", str(out / "fish.gguf"), "--quantize", "F32"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_f32_gguf_matches_transformers(f32_run):
    out, stdout = f32_run
    assert "[ok] tokenizer: 6/6 texts tokenize identically" in stdout
    m = re.search(r"\[ok\] logits: max \|logit diff\| = ([0-9.e+-]+)", stdout)
    assert m, stdout
    assert float(m.group(1)) < 1e-4
    assert "[ok] eos: llama.cpp EOS id 151643 == <|endoftext|>" in stdout
    assert "[ok] stop: forced '###' -> finish_reason=stop" in stdout
    assert "[ok] stop" in stdout and "forced '<|endoftext|>' -> finish_reason=stop" in stdout
    assert re.search(r"\[ok\] greedy: finish_reason=(stop|length)", stdout)
    # Modelfile next to the GGUF, FROM relative to itself
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert "\nFROM ./fish.gguf\n" in text
    assert not list(out.glob("*-f16.gguf"))  # F32 is written directly, no intermediate


def test_f32_gguf_metadata_and_tensors(f32_run, smoke_model_dir):
    import gguf

    out, _ = f32_run
    fields, tensors = gguf_fields(out / "fish.gguf")
    cfg = json.loads((smoke_model_dir / "config.json").read_text())
    assert fields["general.architecture"] == "qwen2"
    assert fields["general.name"] == "Qwen2-1.5B fish-care"
    assert fields["general.base_model.0.repo_url"] == "https://huggingface.co/Qwen/Qwen2-1.5B"
    assert fields["qwen2.block_count"] == cfg["num_hidden_layers"]
    assert fields["qwen2.context_length"] == cfg["max_position_embeddings"]
    assert fields["qwen2.embedding_length"] == cfg["hidden_size"]
    assert fields["qwen2.feed_forward_length"] == cfg["intermediate_size"]
    assert fields["qwen2.attention.head_count"] == cfg["num_attention_heads"]
    assert fields["qwen2.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert fields["qwen2.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert fields["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg["vocab_size"] == 151936
    assert tokens[151643:151646] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[151643:151646] == [gguf.TokenType.CONTROL] * 3
    assert tokens[151646] == "[PAD151646]" and types[151646] == gguf.TokenType.UNUSED
    assert types[0] == gguf.TokenType.NORMAL
    assert len(fields["tokenizer.ggml.merges"]) > 150000
    assert fields["tokenizer.ggml.eos_token_id"] == 151643  # alpaca ends answers with <|endoftext|>
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == get_template("alpaca").jinja_chat_template()
    # tied embeddings: no output.weight; norms and biases F32
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert tensors["blk.0.attn_q.bias"].type_name == "F32"
    assert tensors["output_norm.weight"].type_name == "F32"
    assert len(tensors) == 2 + cfg["num_hidden_layers"] * 12


def test_q8_0_and_f16_without_llama_cpp(smoke_model_dir, tmp_path):
    """llama_cpp made unimportable: Q8_0 (gguf's own quantizer) and F16 still work."""
    import gguf
    from safetensors.numpy import load_file

    for qtype in ("Q8_0", "F16", "BF16"):
        code = (
            "import sys; sys.modules['llama_cpp'] = None; "
            "from fishtune.errors import run_cli; from fishtune.export import gguf_cli; "
            f"sys.exit(run_cli(gguf_cli.main)(['--hf-model-dir', {str(smoke_model_dir)!r}, "
            f"'--output-file', {str(tmp_path / qtype / 'm.gguf')!r}, '--quantize', {qtype!r}, '--no-verify']))"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"({qtype}, " in proc.stdout, proc.stdout
    _, infos = read_gguf_header(tmp_path / "Q8_0" / "m.gguf")
    q8 = {t.name: t for t in infos}["token_embd.weight"]
    assert q8.type_name == "Q8_0"
    ref = load_file(str(smoke_model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    nbytes = ref.shape[0] * ref.shape[1] // 32 * 34
    raw = np.fromfile(tmp_path / "Q8_0" / "m.gguf", dtype=np.uint8, count=nbytes, offset=q8.offset)
    deq = gguf.quants.dequantize(raw.reshape(ref.shape[0], -1), gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(deq - ref).max() <= np.abs(ref).max() / 127 + 1e-6  # Q8_0: 1/127 of each block's max
    assert tensor_type_counts(tmp_path / "F16" / "m.gguf").keys() == {"F16", "F32"}
    assert not list((tmp_path / "F16").glob("*-f16.gguf"))
    assert tensor_type_counts(tmp_path / "BF16" / "m.gguf").keys() == {"BF16", "F32"}


def test_sharded_checkpoint_gives_the_same_file(f32_run, smoke_model_dir, tmp_path):
    """model-0000x-of-00002.safetensors + index: byte-identical GGUF to the single-file checkpoint."""
    from safetensors.numpy import load_file, save_file

    hf = tmp_path / "sharded"
    hf.mkdir()
    for f in smoke_model_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (hf / f.name).symlink_to(f.resolve())
    tensors = load_file(str(smoke_model_dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(hf / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert gguf_cli.main(["--hf-model-dir", str(hf), "--output-file", str(tmp_path / "fish.gguf"),
                                 "--quantize", "F32", "--no-verify"]) == 0
    assert (tmp_path / "fish.gguf").read_bytes() == (f32_run[0] / "fish.gguf").read_bytes()
    (hf / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match=r"model-00002-of-00002\.safetensors is missing \(listed in model\.safetensors\.index\.json"):
        gguf_cli.main(["--hf-model-dir", str(hf), "--output-file", str(tmp_path / "x.gguf")])


def test_q4_k_m_on_k256_uses_k_quants(smoke_model_k256_dir, tmp_path):
    out = tmp_path / "ollama_model" / "qwen2-fish.gguf"
    proc = subprocess.run(
        [sys.executable, "convert_to_gguf.py", "--hf-model-dir", str(smoke_model_k256_dir), "--output-file", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = tensor_type_counts(out)
    assert counts.get("Q4_K", 0) > 0 and counts.get("Q6_K", 0) > 0, counts  # Q4_K_M's mix
    assert "fell back" not in proc.stdout
    assert (out.parent / "qwen2-fish-f16.gguf").is_file()  # the kept intermediate
    assert "kept the unquantized intermediate" in proc.stdout
    assert "[ok] logits: vs the original weights: top-1 agreement" in proc.stdout
    assert re.search(r"\[ok\] weights: 26 GGUF tensors dequantized vs the HF tensors: max relative RMS error 0\.0", proc.stdout)
    assert "[ok] llama.cpp reads the weights: transformers running the dequantized GGUF weights" in proc.stdout
    assert "[ok] tokenizer" in proc.stdout and "[ok] stop" in proc.stdout
    assert out.stat().st_size < (out.parent / "qwen2-fish-f16.gguf").stat().st_size / 2
    assert "\nFROM ./qwen2-fish.gguf\n" in (out.parent / "Modelfile").read_text(encoding="utf-8")
    # the default pipeline's Modelfile is the repo's top-level one, but for FROM (relative to each file)
    written = (out.parent / "Modelfile").read_text(encoding="utf-8")
    assert written.replace("\nFROM ./qwen2-fish.gguf\n", "\nFROM ./ollama_model/qwen2-fish.gguf\n") == \
        (REPO / "Modelfile").read_text(encoding="utf-8")


def test_q4_k_m_on_tiny_reports_fallback(smoke_model_dir, tmp_path, capsys):
    assert convert(["--hf-model-dir", str(smoke_model_dir), "--output-file", str(tmp_path / "m.gguf"),
                    "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "not a multiple of 256" in out and "fell back to" in out and "Q5_0" in out


def test_project_meta_drives_template_eos_and_modelfile(smoke_model_dir, tmp_path, capsys):
    from fishtune.export.modelfile import parse_modelfile
    from fishtune.project import ProjectMeta

    hf = linked_copy(smoke_model_dir, tmp_path / "hf")
    meta = ProjectMeta(template="chatml", system_prompt="你是鱼医生。", base_model="Qwen/Qwen2-0.5B")
    (hf / "fishtune.json").write_text(json.dumps(meta.to_dict(), ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out" / "m.gguf"
    assert convert(["--hf-model-dir", str(hf), "--output-file", str(out), "--quantize", "F16", "--no-verify",
                    "--modelfile", str(tmp_path / "Modelfile"), "--num-ctx", "2048"]) == 0
    fields, _ = read_gguf_header(out)
    assert fields["tokenizer.ggml.eos_token_id"] == 151645  # <|im_end|>
    assert fields["tokenizer.chat_template"] == get_template("chatml").jinja_chat_template()
    assert fields["general.basename"] == "Qwen2-0.5B"
    cmds = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"))
    d = dict(cmds)
    assert d["model"] == "./out/m.gguf"  # relative to the Modelfile's folder
    assert d["system"] == "你是鱼医生。"
    assert d["template"] == get_template("chatml").ollama_template()
    assert d["num_ctx"] == "2048"
    assert [v for k, v in cmds if k == "stop"] == ["<|im_end|>", "<|endoftext|>"]


def test_llama_family_permute_matches_transformers(smoke_model_dir, tmp_path):
    """A tiny random LlamaForCausalLM (untied, no biases): q/k permuted for llama.cpp's rope."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fishtune.export.gguf_writer import read_hf_model, write_gguf
    from fishtune.export.llama_cpp import open_llama
    from fishtune.project import read_export_meta

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643)
    model = LlamaForCausalLM(cfg).eval()
    hf = tmp_path / "llama"
    model.save_pretrained(hf)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf / f).write_bytes((smoke_model_dir / f).read_bytes())
    m = read_hf_model(hf)
    assert m.arch == "llama"
    write_gguf(m, read_export_meta(hf), tmp_path / "llama.gguf", "F32", progress=False)
    fields, infos = read_gguf_header(tmp_path / "llama.gguf")
    tensors = {t.name for t in infos}
    assert "output.weight" in tensors and "blk.0.attn_q.bias" not in tensors
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    ids = [9707, 1879, 11, 116214, 100655, 106410, 30, 220, 5394, 271]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(tmp_path / "llama.gguf", n_ctx=64, logits_all=True, f32_kv=True)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(ref - got).max() < 1e-4


def test_dry_run_writes_nothing(smoke_model_dir, tmp_path, capsys):
    assert convert(["--hf-model-dir", str(smoke_model_dir), "--output-file", str(tmp_path / "o" / "m.gguf"),
                    "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer.ggml.pre = 'qwen2'" in out
    assert re.search(r"token_embd\.weight\s+model\.embed_tokens\.weight\s+\[151936, 64\]\s+F16", out)
    assert "then llama.cpp Q4_K_M" in out
    assert list(tmp_path.iterdir()) == []


# ---- errors ------------------------------------------------------------------------


def test_unsupported_architecture_is_named(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    with pytest.raises(UserError, match=r"architecture 'MistralForCausalLM' is not supported; supported: Qwen2ForCausalLM, LlamaForCausalLM"):
        gguf_cli.main(["--hf-model-dir", str(hf), "--output-file", str(tmp_path / "m.gguf")])


def test_missing_or_broken_hf_folder(smoke_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"HF model folder .*nope does not exist; run convert_to_huggingface.py"):
        gguf_cli.main(["--hf-model-dir", str(tmp_path / "nope")])
    hf = linked_copy(smoke_model_dir, tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"tokenizer\.json is missing"):
        gguf_cli.main(["--hf-model-dir", str(hf), "--output-file", str(tmp_path / "m.gguf")])
    (hf / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"model\.safetensors is missing .*holds no safetensors weights"):
        gguf_cli.main(["--hf-model-dir", str(hf), "--output-file", str(tmp_path / "m.gguf")])
    (hf / "config.json").unlink()
    (hf / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json is not valid JSON"):
        gguf_cli.main(["--hf-model-dir", str(hf)])


def test_output_exists_needs_force(smoke_model_dir, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(UserError, match=r"output GGUF .*m\.gguf already exists; pass --force"):
        gguf_cli.main(["--hf-model-dir", str(smoke_model_dir), "--output-file", str(tmp_path / "m.gguf")])
    assert (tmp_path / "m.gguf").read_bytes() == b"old"


def test_unknown_quant_type_lists_valid_ones(smoke_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"unknown quantization type 'Q3_K_XL'; choose one of: Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, F16, BF16, F32"):
        gguf_cli.main(["--hf-model-dir", str(smoke_model_dir), "--quantize", "Q3_K_XL"])


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "convert_to_gguf.py", "--hf-model-dir", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: HF model folder") and "Traceback" not in proc.stderr


def test_default_system_prompt_is_the_seed_one():
    from fishtune.project import read_export_meta

    meta = read_export_meta("/nonexistent-dir")
    assert meta.system_prompt == DEFAULT_SYSTEM_PROMPT and meta.template == "alpaca"


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_proof_fails_on_a_broken_conversion(smoke_model_dir, tmp_path, monkeypatch, capsys, qtype):
    """Fault injection: a writer that flips one weight matrix is caught, exit 1, no Modelfile."""
    from fishtune.export import gguf_writer

    real = gguf_writer.load_tensor

    def broken(model, plan):
        arr = real(model, plan)
        return -arr if plan.hf_name == "model.layers.1.mlp.down_proj.weight" else arr

    monkeypatch.setattr(gguf_writer, "load_tensor", broken)
    out = tmp_path / "m.gguf"
    assert convert(["--hf-model-dir", str(smoke_model_dir), "--output-file", str(out), "--quantize", qtype]) == 1
    cap = capsys.readouterr()
    if qtype == "F32":
        assert re.search(r"\[FAIL\] logits: max \|logit diff\| = [0-9.e+-]+ \(limit 0.0001\)", cap.out)
        assert "error: proof failed (logits)" in cap.err
    else:  # quantized: the dequantized tensor is 200% off the HF one
        assert re.search(r"\[FAIL\] weights: .* max relative RMS error 2 \(blk\.1\.ffn_down\.weight; limit 0\.3\)", cap.out)
        assert "[ok] llama.cpp reads the weights" in cap.out
        assert "error: proof failed (weights)" in cap.err
    assert "[ok] tokenizer" in cap.out
    assert out.is_file() and not (tmp_path / "Modelfile").exists()


def test_rope_theta_from_either_config_place(smoke_model_dir, tmp_path, capsys):
    """transformers < 5 writes rope_theta, >= 5 only rope_parameters.rope_theta: both reach qwen2.rope.freq_base."""
    from fishtune.export.gguf_writer import read_hf_model

    cfg = json.loads((smoke_model_dir / "config.json").read_text())
    for i, (top, nested) in enumerate([(None, 1e6), (5e5, None), (5e5, 5e5)]):
        hf = linked_copy(smoke_model_dir, tmp_path / f"hf{i}")
        c = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_parameters")}
        if top is not None:
            c["rope_theta"] = top
        if nested is not None:
            c["rope_parameters"] = {"rope_type": "default", "rope_theta": nested}
        (hf / "config.json").unlink()
        (hf / "config.json").write_text(json.dumps(c))
        assert read_hf_model(hf).rope_theta == (top or nested)
        assert convert(["--hf-model-dir", str(hf), "--output-file", str(tmp_path / "m.gguf"), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"qwen2.rope.freq_base = {float(top or nested)!r}\n" in out, out


def test_other_llama_cpp_quant_types_load_and_run(smoke_model_k256_dir, tmp_path):
    """Q5_K_M, Q6_K and Q4_0 from one F16 intermediate (k256: real K-quant tensors); llama.cpp runs each."""
    from fishtune.export.gguf_writer import read_hf_model, write_gguf
    from fishtune.export.llama_cpp import open_llama, quantize
    from fishtune.project import ProjectMeta

    pytest.importorskip("llama_cpp")
    f16 = tmp_path / "m-f16.gguf"
    write_gguf(read_hf_model(smoke_model_k256_dir), ProjectMeta(base_model=str(smoke_model_k256_dir)), f16, "F16",
               progress=False)
    ids = [9707, 1879, 11, 116214, 100655, 106410, 30, 220]
    for qtype, expect in (("Q5_K_M", "Q5_K"), ("Q6_K", "Q6_K"), ("Q4_0", "Q4_0")):
        out = tmp_path / f"m-{qtype}.gguf"
        quantize(f16, out, qtype, nthread=2)
        counts = tensor_type_counts(out)
        assert counts.get(expect, 0) > 0, (qtype, counts)
        assert out.stat().st_size < f16.stat().st_size * 0.6, qtype
        llm = open_llama(out, n_ctx=64, logits_all=True)
        try:
            llm.eval(ids)  # a multi-token batch through the quantized kernels
            assert np.isfinite(np.asarray(llm.scores[: len(ids)])).all(), qtype
        finally:
            llm.close()


# ---- the architecture registry, the llama.cpp loader, the command dispatcher ------------


def test_architecture_registry_names_unknown_input():
    from fishtune.export.architectures import architectures, by_model_type, for_hf_config

    assert [a.hf_class for a in architectures()] == ["Qwen2ForCausalLM", "LlamaForCausalLM"]
    assert for_hf_config({"architectures": ["LlamaForCausalLM"]}, "c.json").gguf_arch == "llama"
    assert for_hf_config({"model_type": "qwen2"}, "c.json").hf_class == "Qwen2ForCausalLM"  # no architectures
    assert by_model_type("llama", "c.json").tokenizer_pre == "llama-bpe"
    with pytest.raises(UserError, match=r"c\.json: architecture 'mistral' is not supported; supported: qwen2, llama"):
        by_model_type("mistral", "c.json")
    with pytest.raises(UserError, match=r"architecture 'GPT2LMHeadModel' is not supported; supported: Qwen2ForCausalLM"):
        for_hf_config({"architectures": ["GPT2LMHeadModel"], "model_type": "qwen2"}, "c.json")


def test_rope_permutation_round_trips():
    from fishtune.export.architectures import inverse_permute_rope, permute_rope

    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    p = permute_rope(w, 2)
    assert not np.array_equal(p, w) and np.array_equal(inverse_permute_rope(p, 2), w)


def test_repack_rule(tmp_path, monkeypatch, f32_run):
    """Weight repacking is off only for quantized files on AMX CPUs; FISHTUNE_LLAMA_REPACK and repack= override."""
    from fishtune.export import llama_cpp as lc
    from fishtune.export.gguf_file import has_quantized_tensors

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    assert lc.cpu_has_amx(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert not lc.cpu_has_amx(cpuinfo) and not lc.cpu_has_amx(tmp_path / "missing")
    f32 = f32_run[0] / "fish.gguf"
    assert not has_quantized_tensors(f32)
    monkeypatch.delenv(lc.REPACK_ENV, raising=False)
    monkeypatch.setattr(lc, "cpu_has_amx", lambda: True)
    assert lc.repack_enabled(f32)  # AMX, float file: on
    monkeypatch.setattr(lc, "_has_quantized_tensors", lambda path: True)
    assert not lc.repack_enabled(f32)  # AMX, quantized file: off
    assert lc.repack_enabled(f32, repack=True)
    monkeypatch.setenv(lc.REPACK_ENV, "1")
    assert lc.repack_enabled(f32)
    monkeypatch.setattr(lc, "cpu_has_amx", lambda: False)
    monkeypatch.setenv(lc.REPACK_ENV, "0")
    assert not lc.repack_enabled(f32)
    monkeypatch.setenv(lc.REPACK_ENV, "yes")
    with pytest.raises(UserError, match="FISHTUNE_LLAMA_REPACK='yes': use 1"):
        lc.repack_enabled(f32)


def test_open_llama_scopes_the_workaround_to_the_load(f32_run):
    pytest.importorskip("llama_cpp")
    import llama_cpp.llama_cpp as lib

    from fishtune.export.llama_cpp import is_end_of_generation, open_llama, tokenize

    default = lib.llama_model_default_params
    llm = open_llama(f32_run[0] / "fish.gguf", n_ctx=64, repack=False)
    try:
        assert llm.model_params.use_extra_bufts is False
        assert lib.llama_model_default_params is default and lib.llama_model_default_params().use_extra_bufts
        eos = llm.token_eos()
        assert is_end_of_generation(llm, eos) and not is_end_of_generation(llm, tokenize(llm, "鱼")[0])
        assert tokenize(llm, "答<|endoftext|>")[-1] == eos
    finally:
        llm.close()


def test_python_m_fishtune_export(smoke_model_dir, tmp_path):
    """``python -m fishtune.export gguf`` takes the script's flags; unknown commands are named."""
    proc = subprocess.run([sys.executable, "-m", "fishtune.export", "gguf", "--hf-model-dir", str(smoke_model_dir),
                           "--output-file", str(tmp_path / "m.gguf"), "--quantize", "F16", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "would write: " in proc.stdout and not list(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "fishtune.export", "quantise"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown command 'quantise'; choose one of: huggingface, gguf, modelfile" in proc.stderr
