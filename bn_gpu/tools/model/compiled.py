"""Every launched kernel variant compiled for the target, and its resources read back."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import torch

from .. import launches as recorded
from .sass import LoopStats, cuobjdump, main_loops
from .targets import Target
from .toolchain import tool


@dataclass
class Compiled:
    backend: str
    variant: str             # the launch's kernel with its specialization, as a short label
    registers: int
    spill_bytes: int         # stack + local memory per thread
    shared_bytes: int
    loops: list

    @property
    def main(self) -> LoopStats | None:
        return self.loops[0] if self.loops else None


def _triton_key(launch) -> tuple:
    signature, constexprs, attrs, options = recorded.triton_compile_inputs(launch)
    return (launch.name, tuple(signature.items()), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
            tuple(sorted(options.items())))


class Compiler:
    """Compiles each distinct launched variant once for the target and analyses it."""

    def __init__(self, target: Target, workdir: str):
        self.target = target
        self.workdir = workdir
        self.cache: dict = {}
        self.cuda_modules: dict = {}

    def triton(self, launch) -> Compiled:
        key = _triton_key(launch)
        if key not in self.cache:
            compiled = recorded.compile_triton(launch, self.target.capability)
            path = os.path.join(self.workdir, f"triton-{len(self.cache)}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            resources, sass = cuobjdump(path)
            name = launch.name
            usage = resources.get(name) or next(iter(resources.values()))
            shared = max(usage["shared"], getattr(compiled.metadata, "shared", 0) or 0)
            dtype = next((a.dtype for a in launch.args if isinstance(a, torch.Tensor)), None)
            flags = ",".join(k for k, v in sorted(launch.meta.items()) if v is True and k.isupper())  # constexprs
            label = (f"{name} {str(dtype).replace('torch.', '')} "
                     + " ".join(f"{k}={v}" for k, v in sorted(launch.meta.items())
                                if k.startswith(("BLOCK", "ROWS")) or (k == "GROUP" and v > 1)
                                or (k == "ALIGN" and v > 1 and launch.meta.get("GROUP", 1) == 1))  # aligned rows
                     + f" warps={launch.meta.get('num_warps', 4)}" + (f" [{flags}]" if flags else ""))
            self.cache[key] = Compiled("triton", label, usage["registers"], usage["stack"] + usage["local"],
                                       shared, main_loops(sass.get(name) or next(iter(sass.values()))))
        return self.cache[key]

    def cuda(self, launch) -> Compiled:
        if launch.kernel not in self.cache:
            self._compile_cuda_module(launch.kernel)
        return self.cache[launch.kernel]

    def _compile_cuda_module(self, expression: str) -> None:
        """Compile every name expression of the module holding `expression` (one nvcc run), as the
        backend's modules are: one per type combination, its on-chip kernels apart."""
        from ...backends.cupy import compilation
        module = next(m for c in compilation.type_combinations() for m in compilation.kernel_modules(*c)
                      if expression in m.values())
        names = sorted(set(module.values()))
        unit = os.path.join(self.workdir, f"cuda-{len(self.cuda_modules)}.cu")
        with open(os.path.join(self.workdir, "batch_norm.cu"), "w") as f:
            f.write(compilation.source())
        with open(unit, "w") as f:
            # Taking each kernel's address instantiates it, as NVRTC's name expressions do.
            f.write('#include "batch_norm.cu"\nvoid instantiate_all() {\n')
            f.write("".join(f"    (void)&{n};\n" for n in names) + "}\n")
        cubin = unit[:-3] + ".cubin"
        arch = f"sm_{self.target.capability}"
        subprocess.run([tool("nvcc"), *compilation.COMPILE_OPTIONS, f"-arch={arch}", "-cubin", "-o", cubin, unit],
                       capture_output=True, text=True, check=True, cwd=self.workdir)
        resources, sass = cuobjdump(cubin)
        demangled = _demangle(list(sass))
        for mangled, instructions in sass.items():
            name = re.sub(r"\(.*", "", demangled.get(mangled, mangled)).replace("void ", "").strip()
            name = re.sub(r"\s+", " ", name)
            usage = resources.get(mangled, dict(registers=0, stack=0, shared=0, local=0))
            for expression in names:
                if _same_template(expression, name):
                    self.cache[expression] = Compiled("cupy", expression, usage["registers"],
                                                      usage["stack"] + usage["local"], usage["shared"],
                                                      main_loops(instructions))
        self.cuda_modules[expression] = names


def _same_template(expression: str, demangled: str) -> bool:
    normalize = lambda s: re.sub(r"\s+", "", s).replace("(int)", "")  # noqa: E731
    return normalize(expression) == normalize(demangled)


def _demangle(names: list[str]) -> dict:
    binary = tool("c++filt")
    if binary is None:
        return {}
    out = subprocess.run([binary], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))
