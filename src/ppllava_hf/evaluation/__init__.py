"""Evaluating PPLLaVA as its paper did: benchmark prompts and answer checks written from PPLLaVA's evaluation scripts
(`prompts`), and an lmms-eval model (`lmms_eval_model`, registered as `ppllava`; it needs the `eval` extra)."""
