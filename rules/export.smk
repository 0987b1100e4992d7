# Interop exports: the finetuned and the base model as plain HF Llama directories (transformers, vLLM),
# the trained LoRA adapter as PEFT folders (lorapipe/exports/llama.py, peft.py), and GGUF for llama.cpp
# (lorapipe/exports/gguf.py). Their paths are in common.smk.


rule export_llama:
    """The finetuned model (LoRA folded) as a plain LlamaForCausalLM: q/k/v split, lm_head rows
    normalised, the chat template in tokenizer_config.json."""
    input:
        **LLAMA_EXPORT_INPUTS,
        ckpt=MERGED_LORA,
    output:
        **llama_dir(HF_LLAMA),
    log:
        log_path("export_llama"),
    benchmark:
        benchmark_path("export_llama")
    conda:
        "../envs/lorapipe.yaml"
    params:
        base=lambda wildcards, input: os.path.dirname(input.base),
        out_dir=lambda wildcards, output: os.path.dirname(output.safetensors),
        position_embedding=rope_export("export_llama"),
    shell:
        "python {input.script} --log {log} --mindspore_ckpt_path {input.ckpt} "
        "--base_model_dir {params.base} --out_dir {params.out_dir} "
        "--position_embedding {params.position_embedding}"


use rule export_llama as export_llama_base with:
    input:
        **LLAMA_EXPORT_INPUTS,
        ckpt=BASE_CKPT,
    output:
        **llama_dir(HF_LLAMA_BASE),
    log:
        log_path("export_llama_base"),
    benchmark:
        benchmark_path("export_llama_base")


rule export_peft:
    """The trained LoRA adapter as PEFT folders: for hf_llama_base (q_proj/k_proj/v_proj), and for the
    Baichuan2 base model (W_pack, rank 3r), with the trained run's rank and alpha."""
    input:
        ckpt=MERGED_CKPT,
        adapter=ADAPTER_CONFIG,
        script=f"{SCRIPTS}/export_peft.py",
    output:
        adapter=f"{PEFT_ADAPTER}/adapter_model.safetensors",
        config=f"{PEFT_ADAPTER}/adapter_config.json",
        w_pack=multiext(
            f"{PEFT_ADAPTER_W_PACK}/",
            "adapter_model.safetensors",
            "adapter_config.json",
        ),
        manifest=f"{PEFT_ADAPTER}/adapter_model.safetensors.manifest.json",
    log:
        log_path("export_peft"),
    benchmark:
        benchmark_path("export_peft")
    conda:
        "../envs/lorapipe.yaml"
    params:
        # What each adapter names as its base (base_model_name_or_path), as paths from the work dir.
        llama_base=HF_LLAMA_BASE,
        w_pack_base=BASE_MODEL,
        out_dir=lambda wildcards, output: os.path.dirname(output.adapter),
        w_pack_dir=lambda wildcards, output: os.path.dirname(output.w_pack[0]),
        position_embedding=rope_export("export_peft"),
    shell:
        "python {input.script} --log {log} --src_ckpt {input.ckpt} "
        "--adapter_config {input.adapter} --out_dir {params.out_dir} "
        "--base_model_name_or_path {params.llama_base} --w_pack_out_dir {params.w_pack_dir} "
        "--w_pack_base_model {params.w_pack_base} --position_embedding {params.position_embedding}"


rule export_gguf:
    """The finetuned model (LoRA folded) as GGUF for llama.cpp, f16 and q8_0: architecture
    llama, q/k permuted for ggml's rotary, lm_head normalised, vocab, chat template."""
    input:
        ckpt=MERGED_LORA,
        base=base_file("config.json"),
        tokenizer=base_file("tokenizer.model"),
        script=f"{SCRIPTS}/export_gguf.py",
    output:
        f16=GGUF_FILES[0],
        q8_0=GGUF_FILES[1],
        modelfile=f"{GGUF_DIR}/Modelfile",
        manifest=f"{GGUF_FILES[0]}.manifest.json",
    log:
        log_path("export_gguf"),
    benchmark:
        benchmark_path("export_gguf")
    conda:
        "../envs/lorapipe.yaml"
    params:
        base=lambda wildcards, input: os.path.dirname(input.base),
        out_dir=lambda wildcards, output: os.path.dirname(output.f16),
        name=config["base_model"]["name"],
        position_embedding=rope_export("export_gguf"),
    shell:
        "python {input.script} --log {log} --mindspore_ckpt_path {input.ckpt} "
        "--base_model_dir {params.base} --out_dir {params.out_dir} --name {params.name} "
        "--type f16 --type q8_0 --position_embedding {params.position_embedding}"
