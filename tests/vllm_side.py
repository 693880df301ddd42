"""The vLLM side of tests/test_vllm.py: greedy tokens of a model served by vLLM, as a user would run it.

Runs in the vLLM venv (./scripts/vllm_venv.sh) as a child process, and imports vLLM only: a ptqtp checkpoint
must load through the plugin's entry point alone (test_vllm.py checks this file never imports ptqtp).

    python tests/vllm_side.py MODEL_DIR OUT.json --prompts '[[1, 2, 3]]' --max-tokens 12 [--tp 2] [--dtype float32]
"""

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=512, max_num_seqs=4,
              tensor_parallel_size=args.tp, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, min_tokens=args.max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    with open(args.out, "w") as f:
        json.dump({"quantization": llm.llm_engine.model_config.quantization,
                   "tokens": [list(o.outputs[0].token_ids) for o in outs]}, f)


if __name__ == "__main__":
    main()
