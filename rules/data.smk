# Data stage: chat JSON -> MindRecord (train and held-out), with stats.


rule mindrecord:
    """The recipe's belle_preprocess.py --seq_length N, plus the held-out split and stats."""
    input:
        data=data_files,
        tokenizer=base_file("tokenizer.model"),
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
        data=config["data"],
    shell:
        "python {input.script} --rule mindrecord --log {log} --input_glob {params.data[train]:q} "
        "--model_file {input.tokenizer} --output_file {output.train} "
        "--seq_length {params.data[seq_length]} --heldout_output_file {output.heldout} "
        "--heldout_fraction {params.data[heldout_fraction]} --split_seed {params.data[split_seed]} "
        "--on_bad_record {params.data[on_bad_record]} --stats_file {output.stats}"
