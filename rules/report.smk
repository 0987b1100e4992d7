# Report: figures and tables that `snakemake --report report.html` collects (with the rule graph).


rule report:
    """Loss curve, token-length histogram, the benchmarks' per-subject differences, and a summary of
    evaluation, benchmarks, data and predictions."""
    input:
        loss=LOSS_TSV,
        stats=DATA_STATS,
        metrics=METRICS,
        predictions=PREDICTIONS,
        tasks=TASK_RESULTS,
        script=f"{SCRIPTS}/make_report.py",
    output:
        loss=report(
            f"{REPORT}/loss.png", category="Training", caption="../report/loss.rst"
        ),
        lengths=report(
            f"{REPORT}/lengths.png", category="Data", caption="../report/lengths.rst"
        ),
        summary=report(
            f"{REPORT}/summary.html",
            category="Summary",
            caption="../report/summary.rst",
        ),
        task_plots=report(
            TASK_PLOTS,
            category="Benchmarks",
            caption="../report/benchmark_subjects.rst",
        ),
        manifest=f"{REPORT}/loss.png.manifest.json",
    log:
        log_path("report"),
    benchmark:
        benchmark_path("report")
    conda:
        "../envs/lorapipe.yaml"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.loss),
    shell:
        "python {input.script} --log {log} --loss_tsv {input.loss} --data_stats {input.stats} "
        "--metrics {input.metrics} --predictions {input.predictions} --tasks {input.tasks} "
        "--out_dir {params.out_dir}"
