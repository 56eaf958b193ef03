"""Bad input: a clear error with PyTorch's exception type and wording, raised before any state
changes -- running statistics and num_batches_tracked stay exactly as they were."""
import pytest
import torch

import bn_gpu
from support import backends_for_cpu_tensors, make_input, make_params

C = 3


def _state():
    weight, bias, running_mean, running_var = make_params(C)
    return dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                num_batches_tracked=torch.tensor(7))


def _snapshot(state):
    return {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _assert_untouched(state, before):
    for name, value in before.items():
        assert torch.equal(state[name], value), f"{name} changed by a refused call"


# (id, exception, message regex, changes applied to a valid training call)
BAD_CALLS = [
    ("1d-input", ValueError, r"at least 2 dims", dict(input=torch.randn(C))),  # only the empty (0,) passes
    ("0d-input", ValueError, r"at least 2 dims", dict(input=torch.tensor(1.0))),
    ("int-input", NotImplementedError, r"\"batch_norm\" not implemented for 'Int'",
     dict(input=torch.ones(4, C, dtype=torch.int32))),
    ("bool-input", NotImplementedError, r"not implemented for 'Bool'", dict(input=torch.ones(4, C, dtype=torch.bool))),
    ("complex-input", NotImplementedError, r"not implemented for 'ComplexFloat'",
     dict(input=torch.ones(4, C, dtype=torch.complex64))),
    ("C-vs-weight", RuntimeError, r"weight should contain 3 elements not 4", dict(weight=torch.ones(4))),
    ("C-vs-bias", RuntimeError, r"bias should contain 3 elements not 2", dict(bias=torch.ones(2))),
    ("C-vs-running-mean", RuntimeError, r"running_mean should contain 3 elements not 5",
     dict(running_mean=torch.zeros(5), running_var=torch.ones(5))),
    ("running-var-2d", RuntimeError, r"running_var should be a 1-D tensor of 3 elements",
     dict(running_var=torch.ones(3, 1))),
    ("running-stats-dtype", RuntimeError, r"running_mean has dtype torch.float64",
     dict(running_mean=torch.zeros(C, dtype=torch.float64))),
    ("running-stats-mixed", RuntimeError, r"must have the same dtype",
     dict(input=make_input((4, C), torch.bfloat16), running_mean=torch.zeros(C, dtype=torch.bfloat16),
          weight=None, bias=None)),
    ("weight-other-device", RuntimeError, r"Expected all tensors to be on the same device",
     dict(weight=torch.ones(C, device="meta"))),
    ("one-value-per-channel", ValueError, r"Expected more than 1 value per channel when training",
     dict(input=torch.randn(1, C))),
    ("one-value-per-channel-spatial", ValueError, r"Expected more than 1 value per channel when training",
     dict(input=torch.randn(1, C, 1, 1))),
    ("eps-zero", ValueError, r"eps must be positive", dict(eps=0.0)),
    ("eps-negative", ValueError, r"eps must be positive", dict(eps=-1e-5)),
    # any real momentum is accepted, as by PyTorch (test_contract.py); the op's schema refuses the rest
    ("momentum-not-a-number", TypeError, r"argument 'momentum' must be a float or None, got str",
     dict(momentum="0.1")),
    ("running-var-alone", RuntimeError, r"must be given together", dict(running_mean=None)),
]


def _call(backend, state, changes, training=True, momentum=0.1, eps=1e-5):
    args = dict(input=make_input((4, C, 5)), weight=state["weight"], bias=state["bias"],
                running_mean=state["running_mean"], running_var=state["running_var"], momentum=momentum, eps=eps)
    args.update(changes)
    return bn_gpu.batch_norm(args.pop("input"), args.pop("running_mean"), args.pop("running_var"),
                             training=training, backend=backend,
                             num_batches_tracked=state["num_batches_tracked"], **args)


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
@pytest.mark.parametrize("bad", BAD_CALLS, ids=lambda b: b[0])
def test_functional_refuses_and_changes_nothing(backend, bad):
    _, error, message, changes = bad
    state = _state()
    before = _snapshot(state)
    with pytest.raises(error, match=message):
        _call(backend, state, changes)
    _assert_untouched(state, before)


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
def test_ops_validate_too(backend):
    state = _state()
    before = _snapshot(state)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.ops.bn_gpu.forward_train(torch.randn(1, C), state["weight"], state["bias"], state["running_mean"],
                                       state["running_var"], state["num_batches_tracked"], 0.1, 1e-5, backend)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        torch.ops.bn_gpu.forward_eval(torch.randn(4, C), torch.ones(4), None, state["running_mean"],
                                      state["running_var"], 1e-5, backend)
    with pytest.raises(RuntimeError, match="argument 'momentum'"):  # the schema: a float or None
        torch.ops.bn_gpu.forward_train(torch.randn(4, C), None, None, None, None, None, "0.1", 1e-5, backend)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.bn_gpu.backward(torch.randn(4, C + 1), torch.randn(4, C), None, torch.zeros(C), torch.ones(C),
                                  True, True, True, backend)
    _assert_untouched(state, before)


def test_eval_without_running_statistics_is_refused():
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        bn_gpu.batch_norm(torch.randn(4, C), None, None, training=False)


def test_eval_accepts_eps_zero_like_torch():
    x = make_input((4, C))
    _, _, rm, rv = make_params(C)
    torch.testing.assert_close(bn_gpu.batch_norm(x, rm, rv, eps=0.0),
                               torch.nn.functional.batch_norm(x, rm, rv, eps=0.0))


MODULE_CASES = [
    ("one-value-per-channel", ValueError, r"Expected more than 1 value per channel", {}, torch.randn(1, C, 1, 1)),
    ("wrong-dims", ValueError, r"expected 4D input \(got 3D input\)", {}, torch.randn(2, C, 4)),
    ("eps-zero", ValueError, r"eps must be positive", dict(eps=0.0), None),
    ("momentum-not-a-number", TypeError, r"argument 'momentum'", dict(momentum=[0.1]), None),
    ("int-input", NotImplementedError, r"not implemented for 'Long'", {}, torch.ones(2, C, 2, 2, dtype=torch.int64)),
]


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c[0])
def test_module_refuses_and_changes_nothing(backend, case):
    """Unlike torch.nn.BatchNorm*, which counts the batch before F.batch_norm refuses it."""
    _, error, message, options, x = case
    bn = bn_gpu.BatchNorm2d(C, backend=backend)
    bn(make_input((4, C, 3, 3)))  # one good step first
    for name, value in options.items():
        setattr(bn, name, value)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(error, match=message):
        bn(x if x is not None else make_input((4, C, 3, 3)))
    for name, value in bn.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        bn_gpu.batch_norm(torch.randn(4, C), None, None, training=True, backend="cuda")
    with pytest.raises(ValueError, match="not a backend for CUDA tensors"):
        bn_gpu.set_backend("cpu")  # the process default is for CUDA tensors: triton or cupy


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_triton_on_cpu_tensors_without_interpreter_names_the_way_out():
    import subprocess
    import sys
    code = ("import torch, bn_gpu\n"
            "bn_gpu.batch_norm(torch.randn(4, 3), None, None, training=True, backend='triton')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "backend='triton' needs CUDA tensors" in result.stderr and "TRITON_INTERPRET=1" in result.stderr
