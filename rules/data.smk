# Data stage: chat data (BELLE, ShareGPT, Alpaca, OpenAI messages; JSON or JSON Lines) -> MindRecord
# (train and held-out), with stats.

from lorapipe.data.sources import draws_samples


rule mindrecord:
    """The recipe's belle_preprocess.py --seq_length N, plus other formats, weighted sources, the
    held-out split and stats."""
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
        data=pick(
            config["data"],
            "train",
            "format",
            "seq_length",
            "heldout_fraction",
            "split_seed",
            "on_bad_record",
            "drop",
            "packing",
        ),
        # train.seed draws the sample of a fractional source weight; other data never depends on it,
        # so that editing train.seed rebuilds no MindRecord that it cannot change.
        sample_seed=(
            config["train"]["seed"] if draws_samples(config["data"]["train"]) else 0
        ),
    shell:
        "python {input.script} --log {log} --data {params.data:q} "
        "--sample_seed {params.sample_seed} --model_file {input.tokenizer} "
        "--output_file {output.train} --heldout_output_file {output.heldout} "
        "--stats_file {output.stats}"
