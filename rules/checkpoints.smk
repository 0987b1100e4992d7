# Checkpoint stage: per-rank training checkpoints -> filtered -> merged -> LoRA folded -> HF export.


rule filter_out:
    """Drop optimizer state and bookkeeping from every rank's checkpoint (filter_ckpt_param.py)."""
    input:
        checkpoints=CHECKPOINT_NETWORK,
        script=f"{SCRIPTS}/filter_ckpt_param.py",
    output:
        checkpoints=directory(FILTER_OUT),
        manifest=f"{FILTER_OUT}.manifest.json",
    log:
        log_path("filter_out"),
    benchmark:
        benchmark_path("filter_out")
    conda:
        "../envs/lorapipe.yaml"
    shell:
        "python {input.script} --log {log} --src_ckpt_dir {input.checkpoints} "
        "--dst_ckpt_dir {output.checkpoints}"


rule merged_ckpt:
    """One complete checkpoint from the per-rank ones (transform_ckpt.py); from checkpoints of the
    trainable parameters only (train.checkpoint_params), with the frozen base put back in.
    """
    input:
        checkpoints=FILTER_OUT,
        base=BASE_CKPT if TRAINABLE_ONLY else [],
        script=f"{SCRIPTS}/transform_ckpt.py",
    output:
        ckpt=MERGED_CKPT,
        manifest=f"{MERGED_CKPT}.manifest.json",
    log:
        log_path("merged_ckpt"),
    benchmark:
        benchmark_path("merged_ckpt")
    conda:
        "../envs/lorapipe.yaml"
    params:
        ranks=config["parallel"]["workers"] * config["parallel"]["nodes"],
        # Data parallel on CPU writes no strategy; semi-auto parallel (Ascend) does.
        strategy=lambda wildcards, input: strategy_flag(input.checkpoints),
        dst_dir=lambda wildcards, output: Path(output.ckpt).parents[1],
        base=lambda wildcards, input: f"--base_ckpt {input.base}" if input.base else "",
    shell:
        "python {input.script} --log {log} --src_ckpt_dir {input.checkpoints} "
        "--dst_ckpt_dir {params.dst_dir} --prefix checkpoint_ --ranks {params.ranks} {params.strategy} "
        "{params.base}"


rule fold_lora:
    """W += (B @ A) * alpha / rank, with the trained run's rank and alpha: the finetuned model as plain
    Baichuan2 weights."""
    input:
        ckpt=MERGED_CKPT,
        adapter=ADAPTER_CONFIG,
        script=f"{SCRIPTS}/fold_lora.py",
    output:
        ckpt=MERGED_LORA,
        manifest=f"{MERGED_LORA}.manifest.json",
    log:
        log_path("fold_lora"),
    benchmark:
        benchmark_path("fold_lora")
    conda:
        "../envs/lorapipe.yaml"
    shell:
        "python {input.script} --log {log} --src_ckpt {input.ckpt} "
        "--adapter_config {input.adapter} --dst_ckpt {output.ckpt}"


rule export_hf:
    """The folded model as an HF directory (safetensors and pytorch_model.bin)."""
    input:
        ckpt=MERGED_LORA,
        base=base_file("config.json"),
        tokenizer=base_file("tokenizer.model"),
        script=f"{SCRIPTS}/export_hf.py",
    output:
        safetensors=f"{HF_EXPORT}/model.safetensors",
        others=multiext(
            f"{HF_EXPORT}/", "pytorch_model.bin", "config.json", "tokenizer.model"
        ),
        manifest=f"{HF_EXPORT}/model.safetensors.manifest.json",
    log:
        log_path("export_hf"),
    benchmark:
        benchmark_path("export_hf")
    conda:
        "../envs/lorapipe.yaml"
    params:
        base=lambda wildcards, input: os.path.dirname(input.base),
        out_dir=lambda wildcards, output: os.path.dirname(output.safetensors),
    shell:
        "python {input.script} --log {log} --mindspore_ckpt_path {input.ckpt} "
        "--base_model_dir {params.base} --out_dir {params.out_dir}"
