# Finetune stage: the rendered MindFormers YAML, and the resource-tagged distributed LoRA finetune.


rule mf_config:
    """The MindFormers YAML the recipe had users hand-edit, rendered from the config. Needs only the
    base model's config.json and tokenizer.model: the checkpoint and the data are finetune's inputs.
    """
    input:
        hf_config=base_file("config.json"),
        tokenizer=base_file("tokenizer.model"),
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
        run_mode="finetune",
        settings=ConfigSection(
            device_target=config["device_target"],
            name=config["base_model"]["name"],
            position_embedding=POSITION_EMBEDDING,
            seq_length=config["data"]["seq_length"],
            packing=config["data"]["packing"],
            lora=config["lora"],
            train=config["train"],
            checkpoint_format=config["checkpoint"]["format"],
            parallel=pick(
                config["parallel"],
                "data_parallel",
                "model_parallel",
                "pipeline_stage",
                "max_device_memory",
            ),
            base_ckpt_dir=BASE_CKPT_DIR,
            train_data=mindrecord("train"),
        ),
    shell:
        "python {input.script} --log {log} --run_mode {params.run_mode} "
        "--hf_config {input.hf_config} --tokenizer {input.tokenizer} "
        "--settings {params.settings:q} --output {output.yaml}"


rule preflight:
    """Before any rank starts, on the host: devices, rank table, checkpoint vs network, tokenizer,
    data, memory per device, shard strategies."""
    input:
        unpack(finetune_inputs),
        tokenizer=base_file("tokenizer.model"),
        hf_config=base_file("config.json"),
        script=f"{SCRIPTS}/preflight.py",
    output:
        report=PREFLIGHT,
        manifest=f"{PREFLIGHT}.manifest.json",
    log:
        log_path("preflight"),
    benchmark:
        benchmark_path("preflight")
    conda:
        "../envs/lorapipe.yaml"
    params:
        parallel=pick(
            config["parallel"],
            "launcher",
            "workers",
            "nodes",
            "master_addr",
            "master_port",
            "visible_devices",
            "hccn_conf",
        ),
        rank_table=lambda wildcards, input: input.get("rank_table", ""),
        allow_longer=(
            "--allow_seq_length_over_max_positions"
            if config["data"]["allow_seq_length_over_max_positions"]
            else ""
        ),
    shell:
        "python {input.script} --log {log} --config {input.config} "
        "--base_ckpt {input.base_ckpt} --tokenizer {input.tokenizer} --train_data {input.train_data} "
        "--hf_config {input.hf_config} --parallel {params.parallel:q} --rank_table={params.rank_table} "
        "{params.allow_longer} --output {output.report}"


rule finetune:
    """LoRA finetune on parallel.workers devices (msrun --join=True, or the rank-table launcher)."""
    input:
        unpack(finetune_inputs),
        preflight=PREFLIGHT,
        script=f"{SCRIPTS}/finetune.py",
        worker=f"{SCRIPTS}/finetune_worker.py",
    output:
        checkpoints=directory(CHECKPOINT_NETWORK),
        loss=LOSS_TSV,
        adapter=ADAPTER_CONFIG,
        rank_logs=directory(f"{FINETUNE}/rank_logs"),
        manifest=f"{CHECKPOINT_NETWORK}.manifest.json",
    log:
        log_path("finetune"),
    benchmark:
        benchmark_path("finetune")
    conda:
        "../envs/lorapipe.yaml"
    threads: config["parallel"]["cpus_per_task"]
    resources:
        npus=config["parallel"]["workers"],
        # The Slurm request (profiles/slurm): every node, one task each, and its devices.
        nodes=config["parallel"]["nodes"],
        tasks=config["parallel"]["nodes"],
        cpus_per_task=config["parallel"]["cpus_per_task"],
        gres=(
            f"npu:{config['parallel']['workers']}"
            if config["device_target"] == "Ascend"
            else ""
        ),
    params:
        device_target=config["device_target"],
        parallel=pick(
            config["parallel"],
            "launcher",
            "workers",
            "nodes",
            "master_addr",
            "master_port",
            "visible_devices",
        ),
        base_model=BASE_MODEL,
        state=FINETUNE_STATE,
        out_dir=lambda wildcards, output: os.path.dirname(output.loss),
        rank_table=lambda wildcards, input: input.get("rank_table", ""),
        restart_if_damaged=config["resume"]["restart_if_damaged"],
    shell:
        "python {input.script} --log {log} --config {input.config} "
        "--restart_if_damaged {params.restart_if_damaged} --worker {input.worker} --state_dir {params.state} --out_dir {params.out_dir} "
        "--device_target {params.device_target} --parallel {params.parallel:q} "
        "--rank_table={params.rank_table} --base_model {params.base_model:q} "
        "--inputs {input.base_ckpt} {input.train_data}"
