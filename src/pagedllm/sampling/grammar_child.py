"""The grammar sandbox's child (run as a script, so it imports llguidance and nothing of pagedllm's).

First line in: {"tokenizer": <tokenizer.json text>, "eos": [ids]}; it answers "ready". Then each line in is a
grammar (a JSON string): it builds the matcher and computes its first mask, as the engine will, and answers
"done" (the engine reads any compile error itself). A grammar that crashes llguidance's native code ends
this process alone; the parent refuses that grammar and starts another child.
"""

import json
import sys


def main() -> None:
    from llguidance import LLMatcher, LLTokenizer

    setup = json.loads(sys.stdin.readline())
    tokenizer = LLTokenizer(setup["tokenizer"], eos_token=setup["eos"])
    print("ready", flush=True)
    for line in sys.stdin:
        matcher = LLMatcher(tokenizer, json.loads(line), log_level=0)
        if not matcher.is_error():
            matcher.compute_logit_bias()
        print("done", flush=True)


if __name__ == "__main__":
    main()
