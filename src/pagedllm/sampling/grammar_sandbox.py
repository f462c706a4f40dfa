"""Grammars compiled first where a crash costs nothing (issue 34).

llguidance is native code: a grammar it cannot handle (a 1,000-deep `$ref` chain overflowed its stack) ends
the whole process with a segmentation fault — the engine core, a batch worker. grammar_bounds.py refuses
the shapes known to do that; this sandbox covers the rest. Each grammar not seen before is compiled first in
a child process (grammar_child.py: the matcher built and its first mask computed, as the engine does); if
the child dies, or takes longer than GRAMMAR_COMPILE_SECONDS, the grammar is refused and a new child serves
the next one. Verdicts are remembered by the grammar's hash, so a schema sent with every request is checked
once and a hostile one costs one child, not one per request.
"""

from __future__ import annotations

import hashlib
import json
import select
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

from ..errors import PagedLLMError
from ..sampling_params import StructuredOutputError

GRAMMAR_COMPILE_SECONDS = 5.0  # real grammars compile in milliseconds
CHILD_START_SECONDS = 60.0  # python, llguidance and the tokenizer (~0.5 s here; slow disks are slower)
REMEMBERED_VERDICTS = 1024
_CHILD = Path(__file__).with_name("grammar_child.py")


class GrammarSandbox:
    """One child process, started on the first grammar, checking grammars one at a time."""

    def __init__(self, tokenizer_json: str, eos_token_ids: list[int], seconds: float = GRAMMAR_COMPILE_SECONDS):
        self._setup = json.dumps({"tokenizer": tokenizer_json, "eos": eos_token_ids}) + "\n"
        self.seconds = seconds
        self._child: subprocess.Popen | None = None
        self._verdicts: OrderedDict[str, str | None] = OrderedDict()  # grammar hash → why refused (None: safe)

    def check(self, grammar: str) -> None:
        """Return if `grammar` compiles without harm; raise StructuredOutputError if not."""
        key = hashlib.sha256(grammar.encode()).hexdigest()
        if key not in self._verdicts:
            self._verdicts[key] = self._try(grammar)
            if len(self._verdicts) > REMEMBERED_VERDICTS:
                self._verdicts.popitem(last=False)
        self._verdicts.move_to_end(key)
        if self._verdicts[key] is not None:
            raise StructuredOutputError(self._verdicts[key])

    def _try(self, grammar: str) -> str | None:
        child = self._running_child()
        if self._ask(child, json.dumps(grammar) + "\n", self.seconds) == "done":
            return None
        timed_out = child.poll() is None
        self._stop()
        if timed_out:
            return f"structured output: the grammar took longer than {self.seconds:g} s to compile"
        return f"structured output: the grammar compiler crashed on this grammar (exit code {child.returncode})"

    def _running_child(self) -> subprocess.Popen:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen([sys.executable, str(_CHILD)], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if self._ask(self._child, self._setup, CHILD_START_SECONDS) != "ready":
                self._stop()
                raise PagedLLMError("structured output: the grammar compiler's process did not start")
        return self._child

    @staticmethod
    def _ask(child: subprocess.Popen, line: str, seconds: float) -> str | None:
        """Send one line; the answer line, or None if the child died or did not answer in time."""
        try:
            child.stdin.write(line)
            child.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        if not select.select([child.stdout], [], [], seconds)[0]:
            return None
        return child.stdout.readline().strip() or None

    def _stop(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child = None

    def close(self) -> None:
        self._stop()

    def __del__(self) -> None:
        self._stop()
