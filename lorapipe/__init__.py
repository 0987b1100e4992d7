"""lorapipe: the Baichuan2 LoRA recipe on MindSpore/MindFormers as a library.

One module per concern; the Snakemake rules and scripts/ only wire these together.
"""

__version__ = "0.1.0"
