# Predict and evaluate: the finetuned model beside the base model.


rule predict_config:
    """The recipe's predict YAML (run_baichuan2_7b_910b.yaml): use_past, fp32 weights, the
    generation settings, and the tokenizer in processor.tokenizer.vocab_file."""
    input:
        hf_config=base_file("config.json"),
        tokenizer=base_file("tokenizer.model"),
        script=f"{SCRIPTS}/render_mindformers_config.py",
    output:
        yaml=PREDICT_CONFIG,
        manifest=f"{PREDICT_CONFIG}.manifest.json",
    log:
        log_path("predict_config"),
    benchmark:
        benchmark_path("predict_config")
    conda:
        "../envs/lorapipe.yaml"
    params:
        device_target=config["device_target"],
        name=config["base_model"]["name"],
        position_embedding=config["base_model"].get("position_embedding", "auto"),
        generation=pick(
            config["predict"],
            "max_new_tokens",
            "do_sample",
            "top_k",
            "top_p",
            "temperature",
            "repetition_penalty",
        ),
    shell:
        "python {input.script} --rule predict_config --log {log} --run_mode predict "
        "--hf_config {input.hf_config} --tokenizer {input.tokenizer} "
        "--device_target {params.device_target} --name {params.name} "
        "--position_embedding {params.position_embedding} "
        "--generation {params.generation:q} --output {output.yaml}"


rule predict:
    """Chat answers to predict.prompts from the finetuned (LoRA folded) and the base model."""
    input:
        config=PREDICT_CONFIG,
        finetuned=MERGED_LORA,
        base=BASE_CKPT,
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
        prompts=config["predict"]["prompts"],
    shell:
        "python {input.script} --rule predict --log {log} --config {input.config} --run_mode predict "
        "--use_parallel False --auto_trans_ckpt False --load_checkpoint {input.finetuned} "
        "--compare_checkpoint {input.base} --predict_data {params.prompts:q} "
        "--output {output.predictions}"


rule evaluate:
    """Held-out loss and perplexity, base vs finetuned, with the training masking."""
    input:
        config=MF_CONFIG,
        finetuned=MERGED_LORA,
        base=BASE_CKPT,
        heldout=mindrecord("heldout"),
        script=f"{SCRIPTS}/evaluate.py",
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
        "python {input.script} --rule evaluate --log {log} --config {input.config} "
        "--load_checkpoint {input.finetuned} --compare_checkpoint {input.base} "
        "--eval_dataset {input.heldout} --output {output.metrics}"
