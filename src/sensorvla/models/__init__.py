"""The policy: Qwen-VL backbone, sensor encoder, fusion, action heads, fine-tuning and the model file formats."""
