# Cluster stage: the HCCL rank table (used by the rank_table launcher on Ascend). With several nodes,
# every node of the Slurm allocation writes its own table (srun) and the tables are merged.


_HCCL_TOOLS = (
    "python {input.script} --rule rank_table --device_num {params.device_num:q} "
    "--visible_devices {params.visible_devices} --hccn_conf {input.hccn}"
)
# One node writes its table directly; several write one each under srun (each resolves its own IP),
# then merge_hccl.py renumbers the ranks node by node. The job's shell already runs in a job step (the
# executor's `srun -n1`): --ntasks overrides the SLURM_NTASKS=1 it leaves, and --overlap lets this step
# share that step's CPUs, else srun waits forever for "busy" nodes.
RANK_TABLE_SHELL = (
    f"{_HCCL_TOOLS} --log {{log}} --server_ip={{params.server_ip:q}} --output {{output.table}}"
    if config["parallel"]["nodes"] == 1
    else "srun --nodes={params.nodes} --ntasks={params.nodes} --ntasks-per-node=1 --overlap bash -c "
    f'"exec {_HCCL_TOOLS} --output {{output.table}}.node\\$SLURM_NODEID.json" > {{log}} 2>&1 && '
    "python {input.merge} --log {log} {params.node_tables} --output {output.table}"
)


rule rank_table:
    """The recipe's hccl_tools.py --device_num "[0,N)" for this node (and merge_hccl.py for several)."""
    input:
        hccn=hccn_conf,
        script=f"{SCRIPTS}/hccl_tools.py",
        merge=f"{SCRIPTS}/merge_hccl.py",
    output:
        table=RANK_TABLE,
        manifest=f"{RANK_TABLE}.manifest.json",
    log:
        log_path("rank_table"),
    benchmark:
        benchmark_path("rank_table")
    conda:
        "../envs/lorapipe.yaml"
    resources:
        # Under Slurm: every node of the table, one task each (the executor plugin's own resources).
        nodes=config["parallel"]["nodes"],
        tasks=config["parallel"]["nodes"],
    params:
        device_num=f"[0,{config['parallel']['workers']})",
        visible_devices=config["parallel"]["visible_devices"],
        server_ip=config["parallel"]["server_ip"] or "",
        nodes=config["parallel"]["nodes"],
        node_tables=lambda wildcards, output: node_rank_tables(output.table),
    shell:
        RANK_TABLE_SHELL
