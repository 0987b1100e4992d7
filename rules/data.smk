# Data stage: BELLE chat JSON -> MindRecord (train and held-out), with stats.


rule mindrecord:
    """The recipe's belle_preprocess.py --seq_length N, plus the held-out split and stats."""
    input:
        data=data_files(),
        tokenizer=f"{base_model_dir()}/tokenizer.model",
        script=f"{SCRIPTS}/belle_preprocess.py",
    output:
        train=mindrecord("train"),
        train_db=f"{mindrecord('train')}.db",
        heldout=mindrecord("heldout"),
        heldout_db=f"{mindrecord('heldout')}.db",
        stats=DATA_STATS,
        manifest=f"{mindrecord('train')}.manifest.json",
    log:
        log_path("mindrecord"),
    benchmark:
        benchmark_path("mindrecord")
    conda:
        "../envs/lorapipe.yaml"
    params:
        # the pattern as written (a file or a glob); the matching files are the input
        input_glob=lambda wildcards: config["data"]["train"],
        seq_length=SEQ,
        heldout_fraction=config["data"]["heldout_fraction"],
        split_seed=config["data"]["split_seed"],
        on_bad_record=config["data"]["on_bad_record"],
    shell:
        "python {input.script} --rule mindrecord --log {log} --input_glob {params.input_glob:q} "
        "--model_file {input.tokenizer} --output_file {output.train} --seq_length {params.seq_length} "
        "--heldout_output_file {output.heldout} --heldout_fraction {params.heldout_fraction} "
        "--split_seed {params.split_seed} --on_bad_record {params.on_bad_record} "
        "--stats_file {output.stats}"
