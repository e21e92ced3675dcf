"""The export stage: a fine-tuned adapter -> Hugging Face, PEFT, GGUF and Ollama.

Pipeline and modules (nothing is imported here, so ``--help`` stays cheap)::

    adapter --hf.py--> fused HF folder (+ peft_adapter.py: peft_adapter/)      convert_to_huggingface.py
    HF folder --gguf_writer.py--> GGUF --llama_cpp.quantize--> quantized GGUF  convert_to_gguf.py
              --verify.py (llama.cpp vs transformers)--> modelfile.py: Modelfile

* ``architectures``: one registered class per model family (Qwen2, Llama);
* ``gguf_types``: the output type names; ``gguf_file``: reading GGUF files back;
* ``llama_cpp``: the one place that imports llama-cpp-python (loading with the
  repack workaround, quantizing, vocab queries);
* ``gguf_meta``: which template / system prompt a GGUF was made for;
* ``gguf_pipeline``: the GGUF stage's steps; ``hf_cli``, ``gguf_cli``,
  ``modelfile_cli``: the command lines (``python -m fishtune.export COMMAND``).
"""
