# Cluster stage: the HCCL rank table (used by the rank_table launcher on Ascend).


rule rank_table:
    """The recipe's hccl_tools.py --device_num "[0,N)" for this node."""
    input:
        hccn=config["parallel"]["hccn_conf"],
        script=f"{SCRIPTS}/hccl_tools.py",
    output:
        table=RANK_TABLE,
        manifest=f"{RANK_TABLE}.manifest.json",
    log:
        log_path("rank_table"),
    benchmark:
        benchmark_path("rank_table")
    conda:
        "../envs/lorapipe.yaml"
    params:
        device_num=f"[0,{config['parallel']['workers']})",
        visible_devices=config["parallel"]["visible_devices"],
        server_ip=config["parallel"]["server_ip"] or "",
    shell:
        "python {input.script} --rule rank_table --log {log} --device_num {params.device_num:q} "
        "--visible_devices {params.visible_devices} --server_ip '{params.server_ip}' "
        "--hccn_conf {input.hccn} --output {output.table}"
