"""LLMEngine: add requests, call step() until none are left, read RequestOutputs."""

from __future__ import annotations

import contextlib
import dataclasses

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import torch

from ..config import EngineConfig, SpeculativeConfig
from ..errors import PagedLLMError
from ..attention import KV_Q8_0, Q8_0_VALUES
from ..distributed import check_split
from ..kernels.openmp import release_thread_pool
from ..lora import LoadedAdapter, LoRAError, LoRARegistry
from ..models.loaders import ModelSource, load_model, read_model_config, resolve_model
from ..sampling.structured_output import GrammarCompiler
from ..pooling_params import PoolingParams
from ..sampling_params import SamplingParams
from ..tokenizer import Tokenizer, load_tokenizer
from .cuda_graphs import GraphConfig
from .kv_cache_manager import KVCacheManager, blocks_needed
from .parallel import (ParallelRunner, exit_with_parent, free_port, join_group, receive_plan, send_plan, serve_steps,
                       start_workers)
from .model_runner import ModelRunner, plan_kv_cache
from .runner_output import ModelRunnerOutput
from .deltas import LogprobRow, RequestDelta
from .output_processor import OutputProcessor
from .prompt import Prompt, RequestError, prompt_ids
from .outputs import EngineStats, RequestOutput
from .sequence import Sequence, SequenceStatus
from .scheduler import ScheduledSequence, Scheduler
from .search import ContrastiveSearch, make_search
from .stop_rule import StopRule
from .request import Pooled, Request

log = logging.getLogger(__name__)
THROUGHPUT_WINDOW_S = 10.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Proposer(Protocol):
    """Guesses the next tokens of greedy requests (pagedllm.spec_decode); the engine checks them."""

    def propose_for(self, sequences: list[Sequence], limits: list[int]) -> list[list[int]]: ...


# Builds the proposer a SpeculativeConfig asks for, for a target of this vocabulary, device, dtype,
# block size and attention backend (pagedllm.spec_decode.make_proposer).
ProposerFactory = Callable[[SpeculativeConfig, int, torch.device, torch.dtype, int, str], Proposer]


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None,
                 make_proposer: ProposerFactory | None = None, whole_outputs: bool = True):
        """`make_proposer` is needed when the config asks for speculative decoding (entrypoints pass it).
        `whole_outputs` False: only step_deltas() is called (an engine core, whose client processes the
        outputs), so no sequence's prompt or text is kept here for step()."""
        if config.dtype not in _DTYPES:
            raise PagedLLMError(f"dtype must be one of {', '.join(_DTYPES)}, got {config.dtype!r}")
        self.config = config
        self.device = _device(config.device)
        dtype = _DTYPES[config.dtype]
        torch.manual_seed(config.seed)
        self.source = source or resolve_model(config.model)
        workers, tp, threads = [], None, torch.get_num_threads()
        if config.tensor_parallel_size > 1:  # workers first: each loads its slice while this rank loads its own
            model_config, _ = read_model_config(self.source)
            if model_config.latent_attention:
                raise PagedLLMError("tensor parallelism does not split latent attention (DeepSeek) yet")
            if model_config.qk_norm_whole:  # each rank holds some heads; the norm spans all of them
                raise PagedLLMError("tensor parallelism does not split q/k norms over whole projections (OLMo 2) yet")
            delta_net = "gated_delta_net" in (model_config.layer_mixers or ())
            check_split(model_config.num_attention_heads, model_config.num_key_value_heads, config.tensor_parallel_size,
                        model_config.linear_num_key_heads if delta_net else 0)
            port = free_port()
            workers = start_workers(config.tensor_parallel_size, port, _tensor_parallel_worker, config, self.source)
            tp = join_group(0, config.tensor_parallel_size, port, config.device)
        self.model = load_model(self.source, self.device, dtype, config.quantization, tp)
        self.loras = self._lora_registry()  # before the runner: adapters turn CUDA graphs off
        self.tokenizer: Tokenizer = load_tokenizer(self.source)
        model_len = self.model.config.max_position_embeddings
        self.max_model_len = min(config.scheduler.max_model_len or model_len, model_len)
        kv_dtype = kv_pool_dtype(self.model, config.cache.kv_cache_dtype, dtype)
        hybrid = self.model.config.is_hybrid  # recurrent states: slots planned beside the pages
        self.kv_spec = plan_kv_cache(self.model.config, config.cache.block_size, config.cache.kv_cache_memory_bytes,
                                     kv_dtype, self.model.planned_kv_heads, *(self._state_slots() if hybrid else (0, 0)),
                                     checkpoints=hybrid and config.speculative is not None,
                                     state_bytes=self.model.planned_state_bytes)
        if self.kv_spec.num_blocks < 1:
            raise PagedLLMError(f"kv cache memory {config.cache.kv_cache_memory_bytes} bytes is less than one block "
                                f"({self.kv_spec.bytes_per_block} bytes) after the recurrent states "
                                f"({self.kv_spec.num_state_slots} × {self.kv_spec.state_bytes_per_slot} bytes)")
        self.kv_cache = KVCacheManager(self.kv_spec.num_blocks, self.kv_spec.block_size,
                                       config.cache.enable_prefix_caching, self.model.config.uniform_window(),
                                       self.kv_spec.num_state_slots, self.kv_spec.num_snapshot_slots,
                                       config.cache.state_snapshot_interval, self.kv_spec.num_checkpoint_slots > 0)
        self.stop_rule = StopRule(self.tokenizer.stop_token_ids, self.max_model_len)
        self.scheduler = Scheduler(self.config.scheduler, self.kv_cache, self.stop_rule)
        if tp is not None:
            send_plan(self.kv_spec)  # the workers' pools: as many blocks and state slots as this rank's
        runner = ModelRunner(self.model, self.kv_spec, self.device, dtype, config.attention_backend, kv_dtype,
                             self._graph_config())
        self.runner = ParallelRunner(runner, workers, threads) if tp is not None else runner
        self._requests: dict[str, Request] = {}  # by the caller's request id
        self._live: dict[str, tuple[Request, Sequence]] = {}  # each unfinished sequence and its request, by id
        self._deadlines: list[tuple[float, str]] = []  # heap of (deadline, request id)
        # step()'s outputs, in this process: a stop string found there stops its sequence before the next step
        self._processor = OutputProcessor(self.tokenizer, self.stop_sequence, self.abort) if whole_outputs else None
        self.proposer = self._proposer(config.speculative, make_proposer, dtype)
        self.grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size)
        self._next_seq = 0
        self._stopped: dict[str, Request] = {}  # sequences stopped between steps, reported by the next
        self._totals = [0, 0]  # prompt tokens computed, tokens generated
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated) per step
        release_thread_pool()  # loading ran kernels here; steps may be driven from another thread

    def _state_slots(self) -> tuple[int, int]:
        """A hybrid's recurrent states: (a slot for each sequence that may run at once, snapshot slots for
        its prefix cache), out of at most half of the KV budget (the rest holds the attention layers' pages);
        with prefix caching, what the running ones leave of that half, up to a quarter of the budget (and a
        quarter of the half at least, one at least, before the running ones). Where fewer sequences fit,
        max_num_seqs comes down to them, as a warning says (Qwen3.5-0.8B's states take 19.3 MiB a sequence)."""
        budget, per_sequence = self.config.cache.kv_cache_memory_bytes, self.model.planned_state_bytes
        if self.config.speculative is not None:  # a checkpoint beside each running state (rolled back to)
            per_sequence *= 2
        fit = budget // 2 // per_sequence
        caching = self.config.cache.enable_prefix_caching
        wanted = min(self.config.scheduler.max_num_seqs, fit - max(1, fit // 4) if caching else fit)
        if wanted < 1:
            raise PagedLLMError(f"kv cache memory {budget} bytes cannot hold one sequence's recurrent states "
                                f"({per_sequence} bytes){' and a saved one' if caching else ''} and as much again "
                                "for its pages: raise --kv-cache-memory")
        if wanted < self.config.scheduler.max_num_seqs:
            log.warning("the recurrent states of %d running sequences (%d bytes each) fit in half of the %d-byte KV "
                        "budget beside the prefix cache's: max_num_seqs lowered from %d to %d (raise "
                        "--kv-cache-memory for more)", wanted, per_sequence, budget,
                        self.config.scheduler.max_num_seqs, wanted)
            self.config = dataclasses.replace(self.config, scheduler=dataclasses.replace(self.config.scheduler,
                                                                                         max_num_seqs=wanted))
        return wanted, min(fit - wanted, max(1, budget // 4 // per_sequence)) if caching else 0

    def _lora_registry(self) -> LoRARegistry | None:
        if self.config.lora is None:
            return None
        model_config, family = read_model_config(self.source)
        registry = LoRARegistry(self.model, model_config, family, self.config.lora)
        for name, path in self.config.lora.modules:
            registry.load(name, path)
        return registry

    def _graph_config(self) -> GraphConfig | None:
        """CUDA graphs for decode steps on a GPU, unless --enforce-eager."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None
        return GraphConfig.for_engine(self.config.scheduler.max_num_seqs, self.max_model_len,
                                      self.config.cache.block_size, capture=True)

    def _proposer(self, spec: SpeculativeConfig | None, make_proposer: ProposerFactory | None,
                  dtype: torch.dtype) -> Proposer | None:
        if spec is None:
            return None
        if make_proposer is None:
            raise PagedLLMError("speculative decoding needs a proposer factory: build the engine with "
                                "pagedllm.entrypoints.create_engine")
        return make_proposer(spec, self.model.config.vocab_size, self.device, dtype, self.config.cache.block_size,
                             self.config.attention_backend)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | PoolingParams | None = None,
                    lora: str | None = None) -> None:
        """`params`: how to generate, or how to pool the prompt into an embedding (PoolingParams: nothing is
        sampled; the request finishes when its prompt is computed). `lora`: the name of a loaded LoRA adapter
        (None: the base model)."""
        pooling = params if isinstance(params, PoolingParams) else None
        params = SamplingParams(max_tokens=1, temperature=0) if pooling is not None else params or SamplingParams()
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        lora_id = self.lora_adapter(lora).id if lora is not None else 0
        text, ids = prompt_ids(prompt, self.tokenizer)
        self._check_admissible(ids, params)
        grammar = self.grammars.matcher(params.structured_output) if params.structured_output else None
        arrival = time.monotonic()
        request = Request(request_id, params, ids, self._generators(params),
                          arrival + params.timeout if params.timeout is not None else None,
                          prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        request.pooled = Pooled(pooling.pooling, len(ids), pooling.normalize) if pooling is not None else None
        sequence = Sequence(self._sequence_id(), ids, params, arrival_time=arrival, lora_id=lora_id, grammar=grammar,
                            pools=pooling is not None, stop_ids=self.stop_rule.stop_ids(params))
        self._add_sequence(request, sequence)
        if params.search is not None:
            self._start_search(request, sequence)
        elif params.num_sequences > 1:
            sequence.fan_out = request.generators
        self._requests[request_id] = request
        if self._processor is not None:
            self._processor.add(request_id, ids, text, pooling or params)
        if request.deadline is not None:
            heapq.heappush(self._deadlines, (request.deadline, request_id))
        self.scheduler.add_waiting(sequence)

    def _start_search(self, request: Request, root: Sequence) -> None:
        params = root.sampling_params
        request.search = make_search(root, params, self.stop_rule)
        max_tokens = request.search.max_tokens
        root.gang = request.request_id
        live = params.top_k if params.penalty_alpha else params.num_sequences
        if live > self.config.scheduler.max_num_seqs:
            raise RequestError(f"{params.search} keeps {live} sequences, more than max_num_seqs "
                               f"({self.config.scheduler.max_num_seqs})")
        needed = request.search.max_blocks(len(root.prompt_token_ids) + max_tokens, self.kv_spec.block_size)
        if needed > self.kv_spec.num_blocks:
            raise RequestError(f"{params.search} may hold {needed} KV blocks; the cache has "
                               f"{self.kv_spec.num_blocks}; raise --kv-cache-memory")

    def _generators(self, params: SamplingParams) -> list[torch.Generator | None]:
        """Seeded requests get one generator per sequence, each seeded from (seed, index)."""
        if params.seed is None:
            return [None] * params.num_sequences
        return [torch.Generator(device=self.device).manual_seed(hash((params.seed, i)) & (2**63 - 1))
                for i in range(params.num_sequences)]

    def _sequence_id(self) -> str:
        self._next_seq += 1
        return f"seq-{self._next_seq}"

    def _add_sequence(self, request: Request, sequence: Sequence) -> None:
        """Make `sequence` the next sample of `request`: its index, generator and what it reports."""
        sequence.index = index = len(request.sequences)
        sequence.generator = request.generators[index] if index < len(request.generators) else None  # searches fork freely
        sequence.delta_logprobs = [] if request.params.reports_logprobs else None
        request.sequences.append(sequence)
        self._live[sequence.seq_id] = (request, sequence)

    def _check_admissible(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        if not ids:
            raise RequestError("the prompt is empty")
        if any(t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        for name, chosen in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            outside = sorted(t for t in chosen if t >= vocab)
            if outside:
                raise RequestError(f"{name} token id {outside[0]} is outside the vocabulary [0, {vocab})", name)
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        if params.num_sequences > self.config.scheduler.max_num_seqs:
            raise RequestError(f"n/best_of ({params.num_sequences}) exceeds max_num_seqs "
                               f"({self.config.scheduler.max_num_seqs})")
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        if blocks_needed(total, self.kv_spec.block_size) > self.kv_spec.num_blocks:
            raise RequestError(f"prompt + max_tokens ({total} tokens) exceed the whole KV cache "
                               f"({self.kv_spec.num_tokens} tokens); raise --kv-cache-memory")

    # -- LoRA adapters -----------------------------------------------------------------------
    def lora_adapter(self, name: str) -> LoadedAdapter:
        if self.loras is None:
            raise RequestError(f"LoRA adapter {name!r} asked for, but LoRA is off: start with --enable-lora "
                               "or --lora-modules")
        try:
            return self.loras.get(name)
        except LoRAError as exc:
            raise RequestError(str(exc)) from None

    @contextlib.contextmanager
    def adapted(self, lora: str | None):
        """Forward passes outside steps (probes) through adapter `lora`, for the length of the block."""
        if lora is None:
            yield
            return
        with self.model.lora_context.applied([(self.lora_adapter(lora).id, None)]):
            yield

    def load_lora(self, name: str, path: str) -> LoadedAdapter:
        """Load an adapter at run time (the engine must have been started with LoRA on)."""
        if self.loras is None:
            raise LoRAError("LoRA is off: start the engine with --enable-lora (or --lora-modules)")
        return self.loras.load(name, path)

    def unload_lora(self, name: str) -> None:
        """Unload an adapter no request uses any more."""
        adapter = self.lora_adapter(name)
        users = sum(1 for q in (*self.scheduler.running, *self.scheduler.waiting) if q.lora_id == adapter.id)
        if users:
            raise LoRAError(f"LoRA adapter {name!r} is in use by {users} running or waiting sequence(s)")
        self.loras.remove(name)

    def abort(self, request_id: str) -> None:
        """Stop a request at once and free its blocks; no output is produced for it."""
        request = self._requests.pop(request_id, None)
        self._stopped.pop(request_id, None)
        if self._processor is not None:
            self._processor.forget(request_id)
        if request is not None:
            for sequence in request.sequences:
                self._finish(sequence, SequenceStatus.FINISHED_ABORTED)

    def stop_sequence(self, request_id: str, index: int) -> None:
        """End sequence `index` of a request (its client found a stop string in its text) and free its blocks;
        the request's next delta reports it."""
        request = self._requests.get(request_id)
        if request is None or request.search is not None or index >= len(request.sequences):
            return
        self._finish(request.sequences[index], SequenceStatus.FINISHED_STOPPED)
        self._stopped[request_id] = request

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass over everything scheduled; the outputs (whole so far) of requests that advanced."""
        if self._processor is None:
            raise PagedLLMError("this engine was made with whole_outputs=False: call step_deltas()")
        return self._processor.apply_all(self.step_deltas())

    def step_deltas(self) -> list[RequestDelta]:
        """One forward pass over everything scheduled; what each request that advanced gained."""
        touched = self._expire_deadlines()
        touched.update(self._stopped)
        self._stopped.clear()
        out = self.scheduler.schedule()
        if out.scheduled:
            self.runner.copy_blocks(self.kv_cache.take_pending_copies())
            self.runner.copy_states(self.kv_cache.take_pending_state_copies())
            tables = [self.kv_cache.block_table(s.sequence) for s in out.scheduled]
            slots = [self.kv_cache.state_slot(s.sequence) for s in out.scheduled] if self.kv_cache.uses_states else None
            prompt_tokens = self._prompt_tokens(out.scheduled)
            result = self.runner.execute_model(out.scheduled, tables, self.grammars.allowed, slots)
            self._record_prompt_logprobs(result.prompt_logprobs)
            self._record_hidden_states(result.hidden)
            forks = self._fork_samples(out.scheduled, result)
            appended = self.scheduler.update_from_output(out.scheduled + forks, result.sampled)
            generated = self._record_appended(appended, result.logprobs, touched)
            self._finish_pooled(out.scheduled, touched)
            generated += self._advance_searches(result.search_rows, touched)
            self._propose_drafts([item.sequence for item in out.scheduled if item.sequence.seq_id in result.sampled])
            self._count(prompt_tokens, generated)
        return self._deltas(touched)

    def _finish_pooled(self, scheduled: list[ScheduledSequence], touched: dict[str, Request]) -> None:
        """Pooling requests whose prompts are computed: their vectors are whole."""
        for item in scheduled:
            sequence = item.sequence
            if sequence.pools and sequence.num_computed_tokens == sequence.num_tokens:
                request, _ = self._live[sequence.seq_id]
                self._finish(sequence, SequenceStatus.FINISHED_STOPPED)
                touched[request.request_id] = request

    def _fork_samples(self, scheduled: list[ScheduledSequence], result: ModelRunnerOutput) -> list[ScheduledSequence]:
        """A request's further samples (n > 1, at its first token) become sequences forked from its first,
        computed as far as it is, each with its own token and logprob row: they join this step's update."""
        forks = []
        for item in scheduled:
            parent = item.sequence
            if not parent.fan_out or parent.seq_id not in result.sampled:
                continue
            parent.fan_out = []
            request, _ = self._live[parent.seq_id]
            tokens, rows = result.sampled[parent.seq_id], result.logprobs.get(parent.seq_id)
            children = [parent] + [self._fork(request) for _ in tokens[1:]]
            for i, child in enumerate(children):
                result.sampled[child.seq_id] = [tokens[i]]
                if rows is not None:
                    result.logprobs[child.seq_id] = [rows[i]]
            forks += [ScheduledSequence(child, item.num_new_tokens) for child in children[1:]]
        return forks

    def _record_appended(self, appended: dict[str, list[int]], logprobs: dict[str, list[LogprobRow]],
                         touched: dict[str, Request]) -> int:
        """Each sequence's appended tokens (and their logprob rows) into its next delta; finished ones leave."""
        count = 0
        for seq_id, tokens in appended.items():
            if not tokens:
                continue
            request, sequence = self._live[seq_id]
            sequence.delta_token_ids += tokens
            if sequence.delta_logprobs is not None:
                sequence.delta_logprobs += logprobs[seq_id][:len(tokens)]
            if sequence.finished:
                self._live.pop(seq_id)
            touched[request.request_id] = request
            count += len(tokens)
        return count

    def _propose_drafts(self, sampled: list[Sequence]) -> None:
        """Ask the proposer for the next drafts of the greedy requests that sampled this step."""
        if self.proposer is None:
            return
        wanting, limits = [], []
        for sequence in sampled:
            params = sequence.sampling_params
            if not sequence.status.finished and params.greedy and params.structured_output is None \
                    and params.search is None:
                wanting.append(sequence)
                limits.append(min(params.max_tokens - len(sequence.output_token_ids),
                                  self.max_model_len - sequence.num_tokens) - 1)
        if wanting:
            for sequence, drafts in zip(wanting, self.proposer.propose_for(wanting, limits)):
                sequence.spec_token_ids = drafts

    def _fork(self, request: Request, parent: Sequence | None = None) -> Sequence:
        """A new sequence of `request` continuing from `parent` (the first sequence by default), sharing its
        blocks and computed as far as it is."""
        parent = parent or request.sequences[0]
        child = Sequence(self._sequence_id(), parent.prompt_token_ids, parent.sampling_params,
                         arrival_time=parent.arrival_time, output_token_ids=list(parent.output_token_ids),
                         num_computed_tokens=parent.num_computed_tokens, first_token_time=parent.first_token_time,
                         gang=parent.gang, lora_id=parent.lora_id, stop_ids=parent.stop_ids,
                         grammar=parent.grammar.deep_copy() if parent.grammar is not None else None)
        self._add_sequence(request, child)
        if self.kv_cache.fork(parent, child):
            self.scheduler.add_running(child)
        else:  # no recurrent-state slot free: the child computes its tokens again once one is
            child.num_computed_tokens = 0
            self.scheduler.add_waiting(child)
        return child

    # -- searches ---------------------------------------------------------------------------
    def _record_hidden_states(self, hidden: dict[str, tuple[int, torch.Tensor]]) -> None:
        """Hand prompt hidden states to contrastive searches (they compare candidates with them) and to
        pooling requests."""
        for seq_id, (start, states) in hidden.items():
            request, _ = self._live[seq_id]
            if isinstance(request.search, ContrastiveSearch):
                request.search.record_context(start, states)
            if request.pooled is not None:
                request.pooled.add(start, states)

    def _advance_searches(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                          touched: dict[str, Request]) -> int:
        """Hand each search sequence's row to its search; advance the searches whose rows are all in."""
        requests: dict[str, Request] = {}
        for seq_id, (logits, hidden) in rows.items():
            request, sequence = self._live[seq_id]
            request.search.record(sequence, logits, hidden)
            requests[request.request_id] = request
        return sum(self._advance_search(request, touched) for request in requests.values() if request.search.ready())

    def _advance_search(self, request: Request, touched: dict[str, Request]) -> int:
        """One search step: fork parents chosen more than once, append the chosen tokens, drop the
        sequences that do not continue."""
        search, previous = request.search, request.search.live
        continuations = search.select()
        children, used = [], set()
        for parent, _ in continuations:  # every fork before any append: forks copy the parent as it was
            children.append(self._fork(request, parent) if parent.seq_id in used else parent)
            used.add(parent.seq_id)
        for child, (_, token) in zip(children, continuations):
            child.output_token_ids.append(token)
            child.first_token_time = child.first_token_time or time.monotonic()
        for sequence in previous:
            if sequence.seq_id not in used:
                self._drop(request, sequence, keep=search.done)
        search.adopt(children)
        if search.done:
            touched[request.request_id] = request
        return len(continuations)

    def _drop(self, request: Request, sequence: Sequence, keep: bool) -> None:
        """Free a search sequence that does not continue (kept in the request if the search ended)."""
        self._finish(sequence, SequenceStatus.FINISHED_STOPPED)
        if not keep:
            request.sequences.remove(sequence)

    def _finish(self, sequence: Sequence, status: SequenceStatus) -> None:
        """End one sequence and free its blocks."""
        if sequence.finished:
            return
        self.scheduler.finish(sequence, status)
        self._live.pop(sequence.seq_id, None)

    def _expire_deadlines(self) -> dict[str, Request]:
        """Finish requests past their deadline (reason "timeout"); they are reported this step."""
        expired: dict[str, Request] = {}
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, request_id = heapq.heappop(self._deadlines)
            request = self._requests.get(request_id)
            if request is None:
                continue
            for sequence in request.sequences:
                self._finish(sequence, SequenceStatus.FINISHED_TIMEOUT)
            request.closed = True
            expired[request_id] = request
        return expired

    def _deltas(self, touched: dict[str, Request]) -> list[RequestDelta]:
        deltas = []
        for request_id, request in touched.items():
            if request.finished:
                del self._requests[request_id]
            if request.search is None or request.finished:  # a search's sequences are candidates until its end
                deltas.append(request.take_delta())
        return deltas

    # -- logprobs ---------------------------------------------------------------------------
    def _record_prompt_logprobs(self, scored: dict[str, tuple[int, list[LogprobRow]]]) -> None:
        for seq_id, (start, rows) in scored.items():
            request, _ = self._live[seq_id]
            if request.prompt_logprobs is not None and len(request.prompt_logprobs) == start + 1:
                request.prompt_logprobs += rows  # else recomputed after a preemption: already recorded

    # -- stats ------------------------------------------------------------------------------
    @staticmethod
    def _prompt_tokens(scheduled: list[ScheduledSequence]) -> int:
        """Prompt tokens computed this step (call before the scheduler records the step)."""
        return sum(min(s.num_new_tokens, len(s.sequence.prompt_token_ids) - s.sequence.num_computed_tokens)
                   for s in scheduled if s.sequence.num_computed_tokens < len(s.sequence.prompt_token_ids))

    def _count(self, prompt: int, generated: int) -> None:
        now = time.monotonic()
        self._totals[0] += prompt
        self._totals[1] += generated
        self._recent.append((now, prompt, generated))
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.kv_cache.num_blocks,
                           self.kv_cache.num_free_blocks, self.scheduler.num_preemptions,
                           self.kv_cache.stats.hit_rate, self._totals[0], self._totals[1],
                           self._recent_rate(1), self._recent_rate(2),
                           self.scheduler.num_draft_tokens, self.scheduler.num_accepted_drafts)

    def snapshot(self) -> dict:
        """The engine at this moment, for the web page's engine panel: its stats, each open sequence and the
        state of every KV block (BlockPool.states)."""
        adapters = {a.id: a.name for a in self.loras.adapters.values()} if self.loras is not None else {}

        def sequence(r: Sequence) -> dict:
            return {"id": r.seq_id, "lora": adapters.get(r.lora_id), "status": r.status.value,
                    "prompt_tokens": len(r.prompt_token_ids),
                    "output_tokens": len(r.output_token_ids), "cached_tokens": r.num_cached_tokens,
                    "computed_tokens": r.num_computed_tokens, "preemptions": r.num_preemptions,
                    "blocks": self.kv_cache.num_held_blocks(r)}

        return {"stats": dataclasses.asdict(self.stats()), "block_size": self.kv_cache.block_size,
                "blocks": self.kv_cache.pool.states(),
                "running": [sequence(r) for r in self.scheduler.running],
                "waiting": [sequence(r) for r in self.scheduler.waiting]}

    def _recent_rate(self, column: int) -> float:
        """Tokens per second over the window: the tokens of every step after the first, over the span."""
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1][0] - self._recent[0][0]
        return sum(step[column] for step in list(self._recent)[1:]) / span if span > 0 else 0.0


def kv_pool_dtype(model, name: str, dtype: torch.dtype) -> torch.dtype:
    """The pool's element type: auto_kv_dtype's choice, a float type, or bytes of q8_0 rows."""
    if name == "auto":
        return auto_kv_dtype(model, dtype)
    if name != "q8_0":
        return _DTYPES[name]
    if model.config.head_dim % Q8_0_VALUES:
        raise PagedLLMError(f"--kv-cache-dtype q8_0 needs a head_dim divisible by {Q8_0_VALUES}; this model's "
                            f"is {model.config.head_dim}")
    return KV_Q8_0


def auto_kv_dtype(model, dtype: torch.dtype) -> torch.dtype:
    """`--kv-cache-dtype auto`: on the CPU with packed weights, float16 (llama.cpp's default), since a long
    decode step reads every cached byte and the packed path is not batch-invariant anyway; float weights
    (`--quantization none`, the batch-invariant reference) keep the model's dtype. Not bfloat16, even where the
    CPU multiplies it natively: the kernels read both at about the same rate (measured on Zen 4 with AVX-512
    BF16) and float16 keeps 3 more bits of each value."""
    if dtype == torch.float32 and model.norm.weight.device.type == "cpu" and model.packed_weights:
        return torch.float16
    return dtype


def _tensor_parallel_worker(rank: int, size: int, port: int, config: EngineConfig, source: ModelSource) -> None:
    """Rank `rank` of a tensor-parallel engine: its slice of the model and of the KV pool, stepping with rank 0."""
    tp = join_group(rank, size, port, config.device)
    exit_with_parent()
    device, dtype = _device(_rank_device(config, rank)), _DTYPES[config.dtype]
    torch.manual_seed(config.seed)
    model = load_model(source, device, dtype, config.quantization, tp)
    kv_dtype = kv_pool_dtype(model, config.cache.kv_cache_dtype, dtype)
    serve_steps(ModelRunner(model, receive_plan(), device, dtype, config.attention_backend, kv_dtype))


def _rank_device(config: EngineConfig, rank: int) -> str:
    """Rank r's device: the r-th of `tensor_parallel_devices`, or cuda:r of the devices this process sees."""
    if config.tensor_parallel_devices:
        return config.tensor_parallel_devices[rank]
    return f"cuda:{rank}" if config.device == "cuda" else config.device


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PagedLLMError("--device cuda was asked for, but no CUDA device is available")
    return device
