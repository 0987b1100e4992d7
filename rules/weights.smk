# Weights stage: the base model (generated tiny default, or the user's HF download) -> MindSpore.

if TINY:

    rule tiny_base:
        """The embedded tiny Baichuan2-shaped HF model; stands in for the 15 GB download."""
        input:
            data=data_files,
            script=f"{SCRIPTS}/make_tiny_base.py",
        output:
            weights=f"{TINY_BASE}/pytorch_model.bin",
            config=f"{TINY_BASE}/config.json",
            others=multiext(
                f"{TINY_BASE}/",
                "generation_config.json",
                "tokenizer_config.json",
                "tokenizer.model",
                "configuration_baichuan.py",
                "modeling_baichuan.py",
                "tokenization_baichuan.py",
            ),
            manifest=f"{TINY_BASE}/pytorch_model.bin.manifest.json",
        log:
            log_path("tiny_base"),
        benchmark:
            benchmark_path("tiny_base")
        conda:
            "../envs/lorapipe.yaml"
        params:
            tiny_base=config["tiny_base"],
            out_dir=lambda wildcards, output: os.path.dirname(output.config),
        shell:
            "python {input.script} --log {log} --data {input.data:q} "
            "--out_dir {params.out_dir} --dims {params.tiny_base:q}"


rule ckpt:
    """HF torch weights -> MindSpore checkpoint in rank_0/ (the recipe's convert_weight.py + mv)."""
    input:
        weights=base_weight_files,
        config=base_file("config.json"),
        script=f"{SCRIPTS}/convert_weight.py",
    output:
        ckpt=BASE_CKPT,
        manifest=f"{BASE_CKPT}.manifest.json",
    log:
        log_path("ckpt"),
    benchmark:
        benchmark_path("ckpt")
    conda:
        "../envs/lorapipe.yaml"
    params:
        dtype=config["base_model"]["dtype"],
        source=lambda wildcards, input: os.path.dirname(input.config),
    shell:
        "python {input.script} --log {log} --torch_ckpt_path {params.source:q} "
        "--mindspore_ckpt_path {output.ckpt} --dtype {params.dtype}"
