"""Chat data -> MindRecord rows, as MindFormers r1.0's belle_preprocess.py builds them, in bounded memory.

sources -> readers -> turns -> conversations -> rows (formats.mindrecord writes them) -> stats; pipeline
runs the step."""
