"""The trained model in the formats other tools load: HF Llama, PEFT, GGUF."""
