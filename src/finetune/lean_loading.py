"""Lean loading: a checkpoint's tensors copied out of their memory-mapped files into the model,
a block at a time, each block's file pages handed back to the kernel once copied, so loading holds
little more than the model. Nothing here runs code from a file: `torch.load(weights_only=True)`
refuses any pickled object that is not a tensor.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.errors import UserError

# The most of a file that loading reads before copying it and handing its pages back.
COPY_BLOCK_BYTES = 16 * 2**20


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save file's tensors, memory-mapped; `weights_only` unpickles nothing but tensors
    and plain containers, so no code in the file can run."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path}: holds Python objects other than tensors; not loaded, since unpickling "
            f"them could run code"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({reason})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: expected a mapping from names to tensors")
    return state


def tensor_from_file(view: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of its own, in `dtype` on `device`, with the values of the memory-mapped `view`.

    Always a copy, even in the file's dtype: a model whose weights pointed into a file mapping
    would keep the whole file mapped, and torch.save would write all of it for each weight.
    """
    tensor = torch.empty(view.shape, dtype=dtype, device=device)
    copy_from_file(tensor, view)
    return tensor


def copy_from_file(
    target: torch.Tensor,
    view: torch.Tensor,
    rows_together: int = 1,
    reorder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """`target[:] = reorder(view)`, a block of rows at a time, each block's file pages dropped
    once copied: so no more than one block of the file is resident at once, however large the
    tensor (an embedding is 1 GB at 70B). `reorder` must work on `rows_together` rows at a time."""
    if view.ndim == 0:
        target.copy_(view)
        return
    row_bytes = view[0].numel() * view.element_size()
    rows = max(1, COPY_BLOCK_BYTES // max(1, row_bytes) // rows_together) * rows_together
    for start in range(0, view.shape[0], rows):
        block = view[start : start + rows]
        target[start : start + rows].copy_(reorder(block) if reorder else block)
        drop_file_pages(block)


def drop_file_pages(view: torch.Tensor) -> None:
    """Let the kernel take back the pages of a memory-mapped tensor that has been copied.

    Pages read through a file mapping count in the process's resident memory until the mapping
    goes, and a file stays mapped while any of its tensors lives: without this, reading a whole
    checkpoint would hold the file and the copies at once. The mapping is private and never
    written, so a page read again comes back from the file unchanged. Only for views of a file:
    on anonymous memory MADV_DONTNEED would zero the pages.
    """
    if sys.platform != "linux" or view.device.type != "cpu" or not view.is_contiguous():
        return
    start = view.data_ptr()
    end = start + view.numel() * view.element_size()
    # Only the pages that lie wholly inside this tensor.
    first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end_page = end // mmap.PAGESIZE * mmap.PAGESIZE
    if end_page > first_page:
        _madvise()(first_page, end_page - first_page, mmap.MADV_DONTNEED)


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
