"""The method registry: each method's definition drives the wrapper, the screen and surgery, and a new
method is one `register` call. Oracles: a plain forward hook on the stock model's q_proj / o_proj
(RoPE is linear, so scaling q_proj's output equals scaling the rotated query on Llama)."""

from __future__ import annotations

import pytest
import torch

from safetyheads import methods
from safetyheads.ablation import ablated, surgery
from safetyheads.errors import UnsupportedModelError, UsageError
from tiny_models import HEAD_DIM, LAYERS, one_thread, random_ids, tiny_model  # noqa: F401

HEAD = (1, 2)


def _hooked_logits(model, ids, where: str, factor: float):
    """Logits with head HEAD's slice of q_proj's output (where='query') or o_proj's input
    (where='output') times factor, by a plain hook."""
    attn = model.model.layers[HEAD[0]].self_attn
    cols = slice(HEAD[1] * HEAD_DIM, (HEAD[1] + 1) * HEAD_DIM)
    if where == "query":
        def hook(module, args, out):
            out = out.clone()
            out[..., cols] *= factor
            return out
        handle = attn.q_proj.register_forward_hook(hook)
    else:
        def hook(module, args):
            x = args[0].clone()
            x[..., cols] *= factor
            return (x,)
        handle = attn.o_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        handle.remove()


@pytest.fixture
def half_query():
    """A method the package does not ship: the head's query x 0.5."""
    m = methods.register(methods.Method("half", "Half Query", "query x 0.5", acts_on="query", takes_epsilon=False,
                                        fixed_factor=0.5, screen="requery", surgery="q_rows"))
    try:
        yield m
    finally:
        del methods.METHODS["half"]


@pytest.mark.parametrize("name", [n for n in methods.names() if methods.get(n).acts_on != "mean"])
def test_every_scaling_method_is_its_registered_factor(name):
    model, ids = tiny_model("llama", True).double(), random_ids(2, 7)
    spec = methods.get(name)
    with ablated(model, [HEAD], name, 1e-3), torch.no_grad():
        got = model(ids).logits
    ref = _hooked_logits(model, ids, spec.acts_on, spec.factor(1e-3))
    assert torch.allclose(got, ref, atol=1e-6)  # RoPE tables are float32


def test_a_new_method_is_one_registry_entry(half_query):
    """Wrapper, engine, screen and surgery pick up a registered method without further code."""
    from safetyheads import screen as S
    from safetyheads.engine import prepare, sweep
    from safetyheads.prompts import Encoded
    from tiny_models import left_pad

    model, ids = tiny_model("llama", True).double(), random_ids(2, 7)
    ref = _hooked_logits(model, ids, "query", 0.5)
    with ablated(model, [HEAD], "half"), torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, atol=1e-6)  # RoPE tables are float32
    enc = Encoded(*left_pad([ids[0], ids[1]]))
    res = sweep(prepare(model, enc), [[HEAD]], "half", want=("logprobs",), progress=False)
    assert torch.allclose(res.logprobs[0].double(), torch.log_softmax(ref[:, -1].double(), -1), atol=1e-5)
    assert "half" in methods.names(screen=True)
    S.screen(model, enc, "half", targets=("ships",), probes=2, progress=False)
    edited = tiny_model("llama", True).double()
    surgery(edited, [HEAD], "half")
    with torch.no_grad():
        assert torch.allclose(edited(ids).logits, ref, atol=1e-6)  # RoPE tables are float32


def test_registry_errors_are_one_line():
    with pytest.raises(UsageError, match="unknown ablation method 'zero'.*undifferentiated"):
        methods.get("zero")
    with pytest.raises(UsageError, match="epsilon"):
        methods.checked("scaling", 1.0)
    methods.checked("uniform", 1.0)  # no ε: ignored
    with pytest.raises(UnsupportedModelError, match="mean"):
        surgery(tiny_model("llama", True), [HEAD], "mean")
    with pytest.raises(UsageError, match="screen supports"):
        from safetyheads import screen as S
        S.check_screen_args("mean", 1e-5, ("ships",), 1, 1, 4)
    assert methods.names() == tuple(methods.METHODS) and len(set(methods.names())) == len(methods.names())
