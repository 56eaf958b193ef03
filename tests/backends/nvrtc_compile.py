"""Compile the CuPy backend's CUDA C source with NVRTC as CuPy does at run time -- no host headers,
the backend's name expressions -- for one GPU target, without a GPU:

    python tests/backends/nvrtc_compile.py LIBNVRTC CUDA_INCLUDE_DIR sm_80

Prints one JSON line: NVRTC's status, its log, the size of the machine code and the name
expressions it could not lower (test_cuda_source.py runs it beside nvcc and checks the line)."""
import ctypes
import json
import sys

from bn_gpu.backends.cupy import compilation


def instantiated_names() -> list[str]:
    """Every kernel instantiation the backend asks NVRTC for, as name expressions."""
    return sorted({name for combo in compilation.type_combinations()
                   for name in compilation.kernel_names(*combo).values()})


def compile_source(library: str, include: str, arch: str) -> dict:
    lib = ctypes.CDLL(library)
    program = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(program), compilation.source().encode(), b"batch_norm.cu",
                                  0, None, None) == 0
    names = instantiated_names()
    for name in names:
        assert lib.nvrtcAddNameExpression(program, name.encode()) == 0
    options = [o.encode() for o in compilation.COMPILE_OPTIONS] + [f"-arch={arch}".encode(), f"-I{include}".encode()]
    status = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    cubin = ctypes.c_size_t()
    if status == 0:
        lib.nvrtcGetCUBINSize(program, ctypes.byref(cubin))
    unlowered = []
    for name in names if status == 0 else []:
        lowered = ctypes.c_char_p()
        if lib.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)) != 0 or not lowered.value:
            unlowered.append(name)
    return {"status": status, "log": log.value.decode(errors="replace"), "cubin_bytes": cubin.value,
            "names": len(names), "unlowered": unlowered}


if __name__ == "__main__":
    print(json.dumps(compile_source(*sys.argv[1:4])))
