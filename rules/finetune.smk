# Finetune stage: the rendered MindFormers YAML, and the resource-tagged distributed LoRA finetune.


rule mf_config:
    """The MindFormers YAML the recipe had users hand-edit, rendered from the config."""
    input:
        hf_config=f"{base_model_dir()}/config.json",
        base_ckpt=base_ckpt(),
        train_data=mindrecord("train"),
        script=f"{SCRIPTS}/render_mindformers_config.py",
    output:
        yaml=MF_CONFIG,
        manifest=f"{MF_CONFIG}.manifest.json",
    log:
        log_path("mf_config"),
    benchmark:
        benchmark_path("mf_config")
    conda:
        "../envs/lorapipe.yaml"
    params:
        settings=json.dumps(finetune_settings()),
    shell:
        "python {input.script} --rule mf_config --log {log} --hf_config {input.hf_config} "
        "--base_ckpt {input.base_ckpt} --train_data {input.train_data} --settings {params.settings:q} "
        "--output {output.yaml}"


rule finetune:
    """LoRA finetune on parallel.workers devices (msrun --join=True, or the rank-table launcher)."""
    input:
        unpack(finetune_inputs),
        script=f"{SCRIPTS}/finetune.py",
        worker=f"{SCRIPTS}/run_baichuan2.py",
    output:
        checkpoints=directory(f"{FINETUNE}/checkpoint_network"),
        loss=f"{FINETUNE}/loss.tsv",
        adapter=f"{FINETUNE}/adapter_config.json",
        rank_logs=directory(f"{FINETUNE}/rank_logs"),
        manifest=f"{FINETUNE}/checkpoint_network.manifest.json",
    log:
        log_path("finetune"),
    benchmark:
        benchmark_path("finetune")
    conda:
        "../envs/lorapipe.yaml"
    threads: config["parallel"]["workers"]
    resources:
        npus=config["parallel"]["workers"],
        slurm_extra=slurm_request(),
    params:
        state=f"{RESULTS}/.finetune_state",
        launch=launch_flags(),
        tokens_per_step=config["train"]["batch_size"]
        * config["parallel"]["data_parallel"]
        * SEQ,
        adapter=json.dumps(adapter_settings()),
        out_dir=lambda wildcards, output: os.path.dirname(output.loss),
        device_target=config["device_target"],
    shell:
        "python {input.script} --rule finetune --log {log} --config {input.config} "
        "--state_dir {params.state} --out_dir {params.out_dir} {params.launch} "
        "--tokens_per_step {params.tokens_per_step} --adapter_config {params.adapter:q} "
        "--device_target {params.device_target} --inputs {input.base_ckpt} {input.train_data}"
