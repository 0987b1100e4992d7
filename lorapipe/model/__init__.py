"""Baichuan2 itself: names and shapes, architecture, network, LoRA, decoder, tokenizer, chat template.

Baichuan2 itself: tensor names and shapes, the architecture, the MindSpore network, LoRA, the host decoder,
the tokenizer and the chat template."""
