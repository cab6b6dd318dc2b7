"""Generation: answers of a model (base, adapter or merged) to the evaluation suites.

`runner.run_generation` writes one `GenerationRecord` per sample, resumably; the backends
(`transformers_backend`, `vllm_backend`) only sample token ids from rendered prompts
(`prompts`), so both produce records of one schema.
"""
