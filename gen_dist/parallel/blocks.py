"""Repeated blocks of a module: FSDP units and regional compilation."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from gen_dist.parallel.stepping import TrainedModule


def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a module that names their class in `_no_split_modules` (as transformers do)."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    return [m for m in module.modules() if names & {c.__name__ for c in type(m).__mro__}]


def shard_units(module: nn.Module) -> list[nn.Module]:
    """FSDP units below a module's root: its repeated blocks, each gathered only while it runs, except those the
    module also uses outside their own forward (`_root_blocks`; diffusers' DiT reads its first block's
    conditioning embedding for its output layer), which stay in the root's unit."""
    keep = {id(m) for m in getattr(module, "_root_blocks", ())}
    # Innermost first: a block that holds other blocks (diffusers' UNet names both) is sharded after them.
    return [b for b in reversed(blocks(module)) if id(b) not in keep]


def compile_block_forwards(module: nn.Module) -> list[tuple[nn.Module, Callable, Callable]]:
    """Each repeated block's forward replaced by one compiled function per block class, bound to the block: the
    block is an argument of the graph, not a constant of it, so every block reuses the graph (compiling each
    bound forward would recompile per block). Returns (block, plain forward, compiled forward)."""
    found = blocks(module)
    shared = {cls: torch.compile(cls.forward) for cls in {type(b) for b in found}}
    forwards = [(b, b.forward, types.MethodType(shared[type(b)], b)) for b in found]
    for b, _, compiled in forwards:
        b.forward = compiled
    return forwards


def compile_blocks(trained: TrainedModule) -> bool:
    """Regional compilation: each repeated block's forward is compiled, the rest of the module stays eager. The
    blocks share one graph (their parameters are its inputs), so compile time does not grow with depth, and
    FSDP's per-block hooks stay outside it. False for a module without repeated blocks."""
    forwards = compile_block_forwards(trained.module)
    if not forwards:
        return False

    @contextmanager
    def eager() -> Iterator[None]:
        for b, plain, _ in forwards:
            b.forward = plain
        try:
            yield
        finally:
            for b, _, compiled in forwards:
                b.forward = compiled

    trained.uncompiled = eager
    return True
