"""The pipeline every analysis goes through: resolve the inputs, open the run folder, run the clean
pass, plan the work in chunks, show progress, and share the chunks among torchrun ranks.

An analysis (ships, gships, sahara, screen, auto, ...) is then only its own arithmetic per chunk:

    inputs = resolve("gships", model, data, prompt, method=..., epsilon=..., layers=..., heads=..., extra={...})
    run = open_run(out, inputs, resume=resume, force=force)     # a ShardedRun over a RunDir
    cache = clean_cache(inputs)                                 # engine.prepare, once per session
    with WorkBar("gships undifferentiated", quiet, inputs.n_layers, len(inputs.texts)) as bar:
        for heads, key in pending_chunks(run, inputs, bar, "gships_L", plan_chunks(inputs.heads, ...)):
            run.write_chunk(key, compute(heads))                # atomic: a kill loses at most this chunk
    run.sync(cache)                                             # [scale-out] rank 0 gathers every rank's chunks
    table = run.read_chunks("gships_")                          # the final tables come from the chunks alone

Because every chunk is computed exactly as in an uninterrupted run and the final tables are built
from the chunks alone, a run resumed after kill -9 writes byte-identical files.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
from tqdm.auto import tqdm

from . import distributed
from .config import CHUNK_ROWS
from .errors import UsageError
from .heads import Head


@dataclass
class Inputs:
    """Everything an analysis needs, resolved once."""
    command: str               # ships | gships | sahara | refusal | screen
    loaded: Any                # models.LoadedModel
    prompt_set: Any            # data.PromptSet
    texts: list[str]           # the exact model inputs (after formatting)
    n_layers: int
    n_heads: int
    heads: list[Head]          # the heads to score, sorted by (layer, head)
    config: dict               # what goes into manifest.json


def plain(obj: Any) -> Any:
    """A config object as a JSON-able dict (dataclass, object with to_dict, dict, or a string)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, dict):
        return obj
    return str(obj)


def check_ablation(method: str, epsilon: float) -> None:
    from . import methods
    methods.get(method)
    # ε is recorded for every method, so an out-of-range value is a mistake whatever the method
    methods.check_epsilon(epsilon)


def load_model_input(model: Any):
    """A `LoadedModel` from a LoadedModel, a ModelConfig or a model spec string."""
    from .models import DEFAULT_MODEL, LoadedModel, load_model
    if isinstance(model, LoadedModel):
        distributed.setup(str(model.model.device))                       # [scale-out] join torchrun's group
        return model
    if model is None or isinstance(model, (str, Path)):
        return load_model(str(model or DEFAULT_MODEL), device=distributed.setup("auto"))  # [scale-out]
    model = replace(model, device=distributed.setup(model.device))      # [scale-out] cuda:LOCAL_RANK per rank
    return model.load()                                                  # config.ModelConfig


def load_prompt_set(data: Any):
    """A `PromptSet` from a PromptSet, a DataConfig or a dataset name/path."""
    from .data import PromptSet, load_prompts
    if isinstance(data, PromptSet):
        prompt_set = data
    elif isinstance(data, (str, Path)):
        prompt_set = load_prompts(str(data))
    else:
        prompt_set = data.load()                                         # config.DataConfig
    if not prompt_set.prompts:
        raise UsageError(f"dataset {prompt_set.name!r} has no prompts left (check --limit/--sample)")
    return prompt_set


def prompt_options(prompt: Any) -> tuple[str, str | None]:
    if prompt is None:
        return "chat", None
    if isinstance(prompt, str):
        return prompt, None
    options = plain(prompt)
    return options.get("format") or options.get("fmt") or "chat", options.get("system_prompt")


def select_heads(n_layers: int, n_heads: int, *, layers: str | None = None, heads: str | None = None,
                 existing: Sequence[Head] | None = None) -> list[Head]:
    """Heads to score: `heads` ("2-26,3-8") if given, else every head that exists (`existing`, e.g.
    `ablation.model_heads(model)`: hybrid models have heads in their softmax-attention layers only;
    default every layer x head); restricted to `layers` ("0-5,7") if given. Out-of-range values raise
    UsageError (in the ablation module's parser), and so does an explicit head that does not exist."""
    from .ablation import parse_heads, parse_layers
    grid = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    present = grid if existing is None else [(int(a), int(b)) for a, b in existing]
    if heads:
        chosen = parse_heads(heads, n_layers, n_heads)
        missing = sorted(set(chosen) - set(present))
        if missing:
            raise UsageError(f"head {missing[0][0]}-{missing[0][1]} does not exist: layer {missing[0][0]} has no "
                             f"softmax-attention head {missing[0][1]} (hybrid or per-layer head counts)")
    else:
        chosen = present
    if layers:
        allowed = set(parse_layers(layers, n_layers))
        chosen = [hd for hd in chosen if hd[0] in allowed]
    chosen = sorted(set((int(a), int(b)) for a, b in chosen))
    if not chosen:
        raise UsageError("no heads selected: --heads and --layers have nothing in common"
                         + ("" if existing is None else " with the model's softmax-attention layers"))
    return chosen


def resolve(command: str, model: Any, data: Any, prompt: Any, *, method: str, epsilon: float,
             layers: str | None, heads: str | None, extra: dict) -> Inputs:
    """Validate the cheap options, load model and prompts, and build the manifest config."""
    from .ablation import num_layers_heads
    from .prompts import format_prompts, template_kwargs
    check_ablation(method, epsilon)
    if int(extra.get("chunk_rows", 1)) < 1:
        raise UsageError(f"--chunk-rows must be at least 1, got {extra['chunk_rows']}")
    prompt_set = load_prompt_set(data)
    loaded = load_model_input(model)
    n_layers, n_heads = num_layers_heads(loaded.model)
    from .ablation import model_heads
    selected = select_heads(n_layers, n_heads, layers=layers, heads=heads, existing=model_heads(loaded.model))
    fmt, system_prompt = prompt_options(prompt)
    # --chat-template-kwargs (PromptConfig.chat_template_kwargs); recorded below as the template variables
    # actually used (with the non-thinking default), only when there are any: older runs keep their config
    user_vars = plain(prompt).get("chat_template_kwargs") if isinstance(plain(prompt), dict) else None
    texts = format_prompts(loaded.tokenizer, list(prompt_set.prompts), fmt, system_prompt, user_vars)
    template_vars = template_kwargs(loaded.tokenizer, user_vars, note=False) if fmt == "chat" else {}
    config = {
        "model": getattr(loaded, "spec", None),
        "weights_sha256": getattr(loaded, "weights_sha256", None),
        # bf16 and float32 scores differ beyond float noise: a resume must not mix their chunks
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "dataset": prompt_set.name,
        "data": {"source": str(prompt_set.source), "sha256": prompt_set.sha256,
                 "n_prompts": len(prompt_set.prompts), "ids": [int(i) for i in prompt_set.ids],
                 "options": plain(data) if not isinstance(data, type(prompt_set)) else None},
        "format": fmt,
        "system_prompt": system_prompt,
        **({"chat_template_kwargs": template_vars} if template_vars else {}),
        # The exact model inputs decide the scores; their hash makes a resume with other prompts fail.
        "inputs_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        "method": method,
        "epsilon": float(epsilon),
        "layers": layers,
        "heads": heads,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_scored_heads": len(selected),
        **extra,
    }
    return Inputs(command, loaded, prompt_set, texts, n_layers, n_heads, selected, config)


def open_run(out: str | Path, inputs: Inputs, *, resume: bool, force: bool):
    from .runs import RunDir
    if out is None:
        raise UsageError("--out RUN_DIR is required")
    # [scale-out] only rank 0 touches the folder; see distributed.ShardedRun
    return distributed.ShardedRun.open(lambda: RunDir.open(
        Path(out), inputs.config, resume=resume, force=force, command=inputs.command,
        model=inputs.loaded, datasets=inputs.prompt_set))


def clean_cache(inputs: Inputs):
    """One clean forward over all prompts (needed on resume too: it is cheap next to a sweep)."""
    from .engine import prepare
    from .prompts import encode
    model = inputs.loaded.model
    encoded = encode(inputs.loaded.tokenizer, inputs.texts, device=getattr(model, "device", None))
    return prepare(model, encoded)


class WorkBar:
    """The progress bar of an analysis, counted in compute rather than in heads.

    An ablation that starts in layer l replays L - l layers, so an early-layer head costs up to L
    times more than a late one: a bar counting heads would give an ETA off by about 2x and sit
    still through a slow layer. This bar counts layer passes x prompts, moves after every sweep
    chunk (the engine reports its work), and shows the heads done in its description. Work found on disk
    when resuming (or given to other ranks) counts as done before the clock starts, so it does not
    inflate the rate."""

    def __init__(self, desc: str, quiet: bool, n_layers: int, n_prompts: int) -> None:
        self.desc, self.n_layers, self.n_prompts = desc, n_layers, n_prompts
        self.disable = quiet or not distributed.is_main()                  # [scale-out]
        self.bar: tqdm | None = None
        self.heads_done = self.heads_total = 0
        self.planned = 0  # work of the chunks added so far
        self.label = "heads"

    def work(self, configs: Sequence[Sequence[Head]]) -> int:
        return distributed.chunk_cost(configs, self.n_layers) * self.n_prompts

    def add(self, chunks: Sequence[tuple[Sequence[Sequence[Head]], bool]], *, later: int = 0,
            label: str = "heads") -> None:
        """Add planned chunks (configs, already done?) to the total; `later` is an estimate of the
        work still to be planned (Sahara's next steps), replaced by their real work when added."""
        done = sum(self.work(c) for c, is_done in chunks if is_done)
        planned = sum(self.work(c) for c, _ in chunks)
        self.heads_total += sum(len(c) for c, _ in chunks)
        self.heads_done += sum(len(c) for c, is_done in chunks if is_done)
        self.label = label
        self.planned += planned
        if self.bar is None:
            self.bar = tqdm(total=self.planned + later, initial=done, desc=self._text(), disable=self.disable,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| [{elapsed}<{remaining}]")
        else:
            self.bar.total = self.planned + later
            if done:
                self.bar.update(done)
        self._describe()

    def advance(self, work: float) -> None:
        """Sweep work finished (negative after an out-of-memory retry)."""
        if self.bar is not None:
            self.bar.update(work)

    def heads(self, n: int) -> None:
        self.heads_done += n
        self._describe()

    def _text(self) -> str:
        return f"{self.desc} ({self.heads_done}/{self.heads_total} {self.label})"

    def _describe(self) -> None:
        if self.bar is not None:
            self.bar.set_description_str(self._text(), refresh=True)

    def __enter__(self) -> "WorkBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def head_list(df: pd.DataFrame) -> list[str]:
    """`LAYER-HEAD` strings of a table's rows (e.g. its top 10 for the manifest)."""
    from .scores import table_heads
    return [f"{a}-{b}" for a, b in table_heads(df)]


def plan_chunks(heads: Sequence[Head], n_prompts: int, chunk_rows: int = CHUNK_ROWS) -> list[list[Head]]:
    """Split `heads` (in layer order) into chunks of whole consecutive layers, each closed once it
    holds at least `chunk_rows` rows (heads x prompts). Deterministic in its arguments, which the run
    config records, so a resumed run finds the same chunks."""
    if chunk_rows < 1:
        raise UsageError(f"--chunk-rows must be at least 1, got {chunk_rows}")
    heads = sorted((int(a), int(b)) for a, b in heads)
    chunks: list[list[Head]] = []
    current: list[Head] = []
    for i, head in enumerate(heads):
        current.append(head)
        layer_ends = i + 1 == len(heads) or heads[i + 1][0] != head[0]
        if layer_ends and len(current) * n_prompts >= chunk_rows:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def chunk_key(prefix: str, heads: Sequence[Head]) -> str:
    """The run-folder key of a chunk: its layer, e.g. ships_L007, or its first and last layer,
    e.g. ships_L003-007 (chunks never share a first layer, so sorted keys = layer order)."""
    first, last = heads[0][0], heads[-1][0]
    return f"{prefix}{first:03d}" if first == last else f"{prefix}{first:03d}-{last:03d}"


def pending_chunks(run, inputs: Inputs, bar: WorkBar, prefix: str, chunks: Sequence[Sequence[Head]],
                   group: Sequence[Head] = (), *, later: int = 0, label: str = "heads"
                   ) -> Iterator[tuple[list[Head], str]]:
    """The chunks of one sweep still to compute: each configuration ablates `group` + one head of
    a chunk. Shares the chunks out among the ranks by cost ([scale-out]; a no-op in one process),
    counts them all on the progress bar (saved ones as done), then yields (heads, chunk key) for
    each chunk not saved yet, in layer order."""
    keyed = [(list(heads), chunk_key(prefix, heads)) for heads in chunks]
    run.plan({key: distributed.chunk_cost([list(group) + [h] for h in heads], inputs.n_layers) for heads, key in keyed})
    bar.add([([list(group) + [h] for h in heads], run.chunk_done(key)) for heads, key in keyed], later=later, label=label)
    for heads, key in keyed:
        if not run.chunk_done(key):
            yield heads, key


def cache_shape(cache) -> tuple[int, int]:
    """(prompts, vocabulary) of a clean cache, from its clean log-probs."""
    lp = getattr(cache, "clean_logprobs")
    return int(lp.shape[0]), int(lp.shape[-1])
