# The experiments of a config (lorapipe/experiments.py), all of them, and compared side by side. Each
# experiment's rules are rules/run.smk's, named <experiment>_<rule>.

import json

COMPARE = f"{config['results']}/compare"


rule all_experiments:
    """Every experiment's `all`."""
    input:
        [getattr(rules, f"{name}_all").input for name in EXPERIMENTS],


rule compare:
    """One row and one loss curve per experiment: held-out loss and perplexity, benchmark accuracy, trainable
    parameters, training time and tokens/s, checkpoint bytes."""
    input:
        metrics=[f"{c['results']}/evaluate/metrics.json" for c in EXPERIMENTS.values()],
        loss=[f"{c['results']}/finetune/loss.tsv" for c in EXPERIMENTS.values()],
        filtered=[f"{c['results']}/filter_out" for c in EXPERIMENTS.values()],
        tasks=[
            f"{c['results']}/evaluate/{t['name']}.json"
            for c in EXPERIMENTS.values()
            for t in c["evaluate"]["tasks"]
        ],
        script=f"{workflow.basedir}/scripts/compare.py",
    output:
        table=report(
            f"{COMPARE}/compare.html",
            category="Experiments",
            caption="../report/compare.rst",
        ),
        csv=f"{COMPARE}/compare.csv",
        curves=report(
            f"{COMPARE}/loss.png",
            category="Experiments",
            caption="../report/compare.rst",
        ),
        manifest=f"{COMPARE}/compare.csv.manifest.json",
    log:
        f"{COMPARE}/compare.log",
    benchmark:
        f"{COMPARE}/compare.tsv"
    conda:
        "../envs/lorapipe.yaml"
    params:
        experiments=json.dumps(
            {
                name: [c["results"], [t["name"] for t in c["evaluate"]["tasks"]]]
                for name, c in EXPERIMENTS.items()
            }
        ),
        out_dir=COMPARE,
    shell:
        "python {input.script} --log {log} --experiments {params.experiments:q} "
        "--out_dir {params.out_dir}"


onsuccess:
    print(
        f"lorapipe: done; experiments in {config['results']}/experiments/, "
        f"compared in {COMPARE}/ (snakemake compare)"
    )
