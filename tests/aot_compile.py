"""Compile every Triton kernel of bn_gpu, in the variants the launchers use, for one GPU target
with Triton's own compiler -- no GPU needed. Run in a process without TRITON_INTERPRET:

    TRITON_INTERPRET=0 python tests/aot_compile.py 90
"""
import sys

import triton
import triton.language as tl

FLOAT_ARGS = {"eps", "momentum", "inv_count"}
X_POINTERS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
PARAM_POINTERS = {"weight_ptr", "bias_ptr", "grad_weight_ptr", "grad_bias_ptr"}
BLOCKS = {"ROWS": 16, "BLOCK_M": 16, "BLOCK_SPLITS": 16, "BLOCK_S": 128, "BLOCK_C": 128}
# (input pointer type, accumulation dtype)
VARIANTS = [("fp32", tl.float32), ("fp16", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)]


def kernels():
    """Every launchable kernel (the names ending in _kernel) of bn_gpu.kernels."""
    from bn_gpu.kernels import channels_first, channels_last, finalize
    return [getattr(module, name) for module in (channels_first, channels_last, finalize)
            for name in sorted(vars(module)) if name.endswith("_kernel")]


def signature(kernel, x_type: str, acc, flags: bool):
    """Triton signature and constexpr values; boolean constexprs all set to `flags`."""
    acc_name = "fp64" if acc == tl.float64 else "fp32"
    types, constexprs = {}, {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
            constexprs[name] = acc if name == "ACC" else BLOCKS.get(name, flags)
        elif name in X_POINTERS:
            types[name] = "*" + x_type
        elif name in PARAM_POINTERS or name.startswith("running_"):
            types[name] = "*fp32"
        elif name == "num_batches_tracked_ptr":
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = "*" + acc_name
        else:
            types[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return types, constexprs


def compile_one(kernel, types: dict, constexprs: dict, capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    try:  # constexprs keyed by name (recent Triton)
        return triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constexprs), target=target)
    except Exception:
        # Releases that key constexprs by argument position; if this fails too, the first error stands.
        names = list(types)
        by_position = {(names.index(name),): value for name, value in constexprs.items()}
        try:
            return triton.compile(ASTSource(fn=kernel, signature=types, constexprs=by_position), target=target)
        except Exception:
            pass
        raise


def compile_all(capability: int) -> int:
    count = 0
    for kernel in kernels():
        for x_type, acc in VARIANTS:
            for flags in (True, False):
                types, constexprs = signature(kernel, x_type, acc, flags)
                compiled = compile_one(kernel, types, constexprs, capability)
                assert compiled.asm["cubin"], (kernel.__name__, x_type, flags)
                count += 1
    return count


if __name__ == "__main__":
    count = compile_all(int(sys.argv[1]))
    assert count == 8 * len(kernels()) and len(kernels()) == 14, count
    print(f"compiled {count} kernel variants for sm_{sys.argv[1]} with triton {triton.__version__}")
