"""RLAIF: turn prompts into preference pairs with an AI judge (`distft-rlaif [overrides]`).

Sample N completions per prompt from a model, let a judge pick the best and the worst, write
prompt/chosen/rejected JSONL (with the judge's reason) ready for `method=dpo` or `method=reward`.
"""
