"""The file formats lorapipe reads and writes a tensor or a row at a time: MindSpore .ckpt, HF weight files."""
