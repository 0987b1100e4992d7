# Predict and evaluate: the finetuned model beside the base model.


rule predict:
    """Chat answers to predict.prompts from the finetuned (LoRA folded) and the base model."""
    input:
        config=MF_CONFIG,
        finetuned=MERGED_LORA,
        base=base_ckpt(),
        tokenizer=f"{base_model_dir()}/tokenizer.model",
        script=f"{SCRIPTS}/run_baichuan2.py",
    output:
        predictions=report(
            PREDICTIONS, category="Predictions", caption="../report/predictions.rst"
        ),
        manifest=f"{PREDICTIONS}.manifest.json",
    log:
        log_path("predict"),
    benchmark:
        benchmark_path("predict")
    conda:
        "../envs/lorapipe.yaml"
    params:
        prompts=" ".join(shlex.quote(p) for p in config["predict"]["prompts"]),
        generation=generation_flags(),
    shell:
        "python {input.script} --rule predict --log {log} --run_mode predict --config {input.config} "
        "--load_checkpoint {input.finetuned} --compare_checkpoint {input.base} --tokenizer {input.tokenizer} "
        "--predict_data {params.prompts} {params.generation} --output {output.predictions}"


rule evaluate:
    """Held-out loss and perplexity, base vs finetuned, with the training masking."""
    input:
        config=MF_CONFIG,
        finetuned=MERGED_LORA,
        base=base_ckpt(),
        heldout=mindrecord("heldout"),
        script=f"{SCRIPTS}/run_baichuan2.py",
    output:
        metrics=METRICS,
        manifest=f"{METRICS}.manifest.json",
    log:
        log_path("evaluate"),
    benchmark:
        benchmark_path("evaluate")
    conda:
        "../envs/lorapipe.yaml"
    shell:
        "python {input.script} --rule evaluate --log {log} --run_mode eval --config {input.config} "
        "--load_checkpoint {input.finetuned} --compare_checkpoint {input.base} --eval_dataset {input.heldout} "
        "--output {output.metrics}"
