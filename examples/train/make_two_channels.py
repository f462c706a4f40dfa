"""Write the worked example's training data (docs/training.md): two channels of 160 rows each.

- `sums`: chat rows — a question about adding two numbers, answered in one fixed sentence pattern.
- `reverse`: prompt/completion rows — spell a word backwards, letter by letter (hard for a small model).

Deterministic (seeded), so the file in this folder is what this script writes:
    python examples/train/make_two_channels.py > examples/train/two_channels.jsonl
"""

import json
import random

WORDS = ("apple bread chair dance eagle flame grape house image juice knife lemon money night ocean piano "
         "queen river stone table uncle voice water yacht zebra cloud plant smile light heart").split()


def rows(rng: random.Random):
    for _ in range(160):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        yield {"channel": "sums", "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}. The sum is {a + b}."}]}
        word = rng.choice(WORDS)
        yield {"channel": "reverse", "prompt": f"Spell '{word}' backwards, letter by letter:",
               "completion": " " + "-".join(reversed(word))}


if __name__ == "__main__":
    for row in rows(random.Random(0)):
        print(json.dumps(row))
