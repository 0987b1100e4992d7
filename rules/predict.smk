# Predict and evaluate: the finetuned model beside the base model. The recipe's predict YAML
# (run_baichuan2_7b_910b.yaml) is rendered like the finetune's (rules/finetune.smk mf_config): use_past,
# fp32 weights, the generation settings, and the tokenizer in processor.tokenizer.vocab_file.


use rule mf_config as predict_config with:
    output:
        yaml=PREDICT_CONFIG,
        manifest=f"{PREDICT_CONFIG}.manifest.json",
    log:
        log_path("predict_config"),
    benchmark:
        benchmark_path("predict_config")
    params:
        run_mode="predict",
        settings=ConfigSection(
            device_target=config["device_target"],
            name=config["base_model"]["name"],
            position_embedding=POSITION_EMBEDDING,
            # the dtypes predict computes in on the device (the host computes in fp32 whatever they are)
            dtypes=pick(config["train"], "compute_dtype", "param_init_type"),
            generation=pick(
                config["predict"],
                "max_new_tokens",
                "do_sample",
                "top_k",
                "top_p",
                "temperature",
                "repetition_penalty",
            ),
        ),


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
    resources:
        **ONE_DEVICE,
    params:
        prompts=config["predict"]["prompts"],
    shell:
        "python {input.script} --log {log} --config {input.config} --run_mode predict "
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
    resources:
        **ONE_DEVICE,
    shell:
        "python {input.script} --log {log} --config {input.config} "
        "--load_checkpoint {input.finetuned} --compare_checkpoint {input.base} "
        "--eval_dataset {input.heldout} --output {output.metrics}"


rule eval_task:
    """C-Eval, CMMLU or MMLU accuracy, base vs finetuned, as lm-evaluation-harness scores it."""
    input:
        config=MF_CONFIG,
        finetuned=MERGED_LORA,
        base=BASE_CKPT,
        hf_config=base_file("config.json"),
        release=lambda wildcards: EVAL_TASKS[wildcards.task]["path"],
        script=f"{SCRIPTS}/eval_tasks.py",
    output:
        result=report(
            f"{RESULTS}/evaluate/{{task}}.json",
            category="Benchmarks",
            caption="../report/benchmark.rst",
        ),
        samples=f"{RESULTS}/evaluate/{{task}}.samples.jsonl",
        manifest=f"{RESULTS}/evaluate/{{task}}.json.manifest.json",
    log:
        f"{RESULTS}/logs/eval_task_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/eval_task_{{task}}.tsv"
    wildcard_constraints:
        task="ceval|cmmlu|mmlu",
    conda:
        "../envs/lorapipe.yaml"
    resources:
        **ONE_DEVICE,
    params:
        task=lambda wildcards: ConfigSection(EVAL_TASKS[wildcards.task]),
    shell:
        "python {input.script} --rule eval_task --log {log} --config {input.config} "
        "--load_checkpoint {input.finetuned} --compare_checkpoint {input.base} "
        "--hf_config {input.hf_config} --task {params.task:q} "
        "--output {output.result} --samples {output.samples}"


rule eval_tasks:
    """Every benchmark of evaluate.tasks (none by default)."""
    input:
        TASK_RESULTS,
