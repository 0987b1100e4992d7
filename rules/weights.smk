# Weights stage: the base model (generated tiny default, or the user's HF download).

if TINY:

    rule tiny_base:
        """The embedded tiny Baichuan2-shaped HF model; stands in for the 15 GB download."""
        input:
            data=config["data"]["train"],
            script=f"{SCRIPTS}/make_tiny_base.py",
        output:
            multiext(f"{RESULTS}/tiny_base/", "pytorch_model.bin", "config.json",
                     "generation_config.json", "tokenizer_config.json", "tokenizer.model"),
            manifest=f"{RESULTS}/tiny_base/pytorch_model.bin.manifest.json",
        params:
            flags=cli_flags("tiny_base"),
        log:
            log_path("tiny_base"),
        benchmark:
            benchmark_path("tiny_base")
        shell:
            "{PYTHON} {input.script} --rule {rule} --log {log} "
            "--data {input.data} --out_dir {RESULTS}/tiny_base {params.flags}"



rule ckpt:
    """HF torch weights -> MindSpore checkpoint in rank_0/ (the recipe's convert_weight.py + mv)."""
    input:
        base_model_files(),
        script=f"{SCRIPTS}/convert_weight.py",
    output:
        ckpt=base_ckpt(),
        manifest=base_ckpt() + ".manifest.json",
    params:
        dtype=config["base_model"]["dtype"],
        source=base_model_dir(),
    log:
        log_path("ckpt"),
    benchmark:
        benchmark_path("ckpt")
    shell:
        "{PYTHON} {input.script} --rule {rule} --log {log} --torch_ckpt_path {params.source} "
        "--mindspore_ckpt_path {output.ckpt} --dtype {params.dtype}"
