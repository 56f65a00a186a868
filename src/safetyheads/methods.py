"""What each head-ablation method IS: the one place that defines them.

A method is where it acts on one attention head, with what factor, whether it takes ε (and its
range), how the gradient screen linearises it, and how (or why not) surgery realises it as a
weight edit. Everything else reads this registry: the attention wrapper (`ablation.HeadAblator`
applies `acts_on` x `factor`), the sweep engine, the screen (`screen_change`), surgery
(`surgery_edit`), evaluate and the CLI's help. Adding a method is one `register` call here plus
its tests; no other module spells a method name.

Pure Python: the CLI reads it for `--help` without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import UsageError

#: The paper's default ε.
DEFAULT_EPSILON = 1e-5


@dataclass(frozen=True)
class Method:
    """One ablation method of a single head h.

    acts_on: "query" multiplies the head's query (after q bias, q-norm and RoPE, i.e. what the
        attention scores see) by `factor(ε)`; "output" multiplies the head's output (before the
        output projection) by `factor(ε)`; "mean" replaces the head's output by its mean output.
    takes_epsilon: whether ε is a parameter (then 0 < ε < 1); methods without ε ignore it.
    screen: how the gradient screen gets the head's output change Δo from the clean pass —
        "requery" calls the model's attention again with the scaled query, "rescale" is
        (factor − 1)·o; None: the screen cannot linearise it.
    surgery: the equivalent weight edit — "q_rows" scales the head's rows of the query projection
        by the factor, "o_cols" the head's input columns of the output projection; None when no
        weight edit is equivalent, with the reason in `no_surgery`.
    """

    name: str
    title: str                                    # as figures and reports name it
    summary: str                                  # one line for --help
    acts_on: Literal["query", "output", "mean"]
    takes_epsilon: bool
    fixed_factor: float | None = None             # the factor of a method without ε
    screen: Literal["requery", "rescale"] | None = None
    surgery: Literal["q_rows", "o_cols"] | None = None
    no_surgery: str = ""

    def factor(self, epsilon: float) -> float:
        """The multiplier applied to the query or output of an ablated head (1 = untouched)."""
        if self.acts_on == "mean":
            return 0.0  # the flag marking replaced heads
        return float(epsilon) if self.takes_epsilon else float(self.fixed_factor)

    def check_epsilon(self, epsilon: float) -> None:
        if self.takes_epsilon:
            check_epsilon(epsilon)

    def recorded_epsilon(self, epsilon: float) -> float | None:
        """ε as a run folder records it: None for methods that do not take one."""
        return float(epsilon) if self.takes_epsilon else None

    def screen_change(self, fn: Callable, module: Any, query, key, value, out, args: tuple, kwargs: dict,
                      epsilon: float):
        """Δo, the head outputs' change under this ablation ([B, T, H, hd], every head at once),
        computed from the clean attention call `out = fn(module, query, key, value, *args, **kwargs)[0]`."""
        if self.screen == "rescale":
            return out * (self.factor(epsilon) - 1.0)
        if self.screen == "requery":
            ablated, _ = fn(module, query * self.factor(epsilon), key, value, *args, **kwargs)
            return ablated - out
        raise UsageError(f"the screen cannot linearise {self.name!r} ablation; use --mode exact")


def check_epsilon(epsilon: float) -> None:
    """ε's range wherever one is given: a factor strictly between 0 (uniform) and 1 (no ablation)."""
    if not (0.0 < float(epsilon) < 1.0):
        raise UsageError(f"epsilon must be between 0 and 1 (exclusive), got {epsilon}")


#: In the order figures and tables list them: the paper's two first.
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


register(Method(
    "undifferentiated", "Undifferentiated Attention",
    "query x epsilon: the head's attention becomes (nearly) uniform over the visible keys",
    acts_on="query", takes_epsilon=True, screen="requery", surgery="q_rows"))
register(Method(
    "scaling", "Scaling Contribution",
    "head output x epsilon: the head's contribution to the residual stream is scaled down",
    acts_on="output", takes_epsilon=True, screen="rescale", surgery="o_cols"))
register(Method(
    "uniform", "Uniform Attention",
    "query x 0: exactly uniform attention over the visible keys",
    acts_on="query", takes_epsilon=False, fixed_factor=0.0, screen="requery", surgery="q_rows"))
register(Method(
    "mean", "Mean Ablation",
    "the head's output replaced by its mean output over the prompts' positions",
    acts_on="mean", takes_epsilon=False,
    no_surgery="surgery cannot realise 'mean' ablation (it needs a bias the output projection may not have)"))


METHOD_REGISTRY = METHODS  # the public name (safetyheads.METHOD_REGISTRY)


def get(name: str) -> Method:
    """The registered method `name`; a one-line UsageError naming the choices otherwise."""
    method = METHODS.get(name)
    if method is None:
        raise UsageError(f"unknown ablation method {name!r}; choose one of {', '.join(METHODS)}")
    return method


def checked(name: str, epsilon: float = DEFAULT_EPSILON) -> Method:
    """`get(name)` with ε validated for methods that take one."""
    method = get(name)
    method.check_epsilon(epsilon)
    return method


def names(*, screen: bool = False) -> tuple[str, ...]:
    """Registered method names (`screen=True`: those the gradient screen can linearise)."""
    return tuple(n for n, m in METHODS.items() if not screen or m.screen is not None)


def cli_help() -> str:
    """The --method help text, from the registry."""
    return "how a head is ablated: " + "; ".join(f"{m.name} = {m.summary}" for m in METHODS.values())
